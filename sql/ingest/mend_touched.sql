-- The rows of one source partition at offsets [${from_offset}, ${to_offset}) (event time at or
-- after the dedupe horizon): rows that may have landed without their aggregates, when the INSERT
-- that wrote them never answered (docs/exactly-once.md, "The aggregates").
SELECT org_id, project_id, hour
FROM ${database}.events
WHERE src_topic = ${topic} AND src_partition = ${partition} AND src_offset >= ${from_offset}
  AND src_offset < ${to_offset} AND hour >= toDateTime(${horizon_hour})
