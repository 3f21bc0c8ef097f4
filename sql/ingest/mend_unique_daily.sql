-- The daily unique-meter sketches of the same rows (schema 005), merged in again (a union).
INSERT INTO ${database}.usage_unique_daily
SELECT org_id, project_id, meter, toDateTime(intDiv(toUInt32(hour), 86400) * 86400) AS day, uniqCombinedState(h)
FROM ${database}.events
ARRAY JOIN unique_meters AS meter, unique_hashes AS h
WHERE src_topic = ${topic} AND src_partition = ${partition} AND src_offset >= ${from_offset}
  AND src_offset < ${to_offset} AND hour >= toDateTime(${horizon_hour})
GROUP BY org_id, project_id, meter, day
