-- The hourly unique-meter sketches of the rows at or after ${from_offset}, merged in again. A
-- sketch is a union: merging hashes it already holds changes nothing, so this is safe whether
-- the view's part of the INSERT landed or not.
INSERT INTO ${database}.usage_unique_hourly
SELECT org_id, project_id, meter, hour, uniqCombinedState(h)
FROM ${database}.events
ARRAY JOIN unique_meters AS meter, unique_hashes AS h
WHERE src_topic = ${topic} AND src_partition = ${partition} AND src_offset >= ${from_offset}
  AND src_offset < ${to_offset} AND hour >= toDateTime(${horizon_hour})
GROUP BY org_id, project_id, meter, hour
