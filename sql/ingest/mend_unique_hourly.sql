-- The hourly unique-meter sketches of those rows (${rows}: mend_last_attempt.sql), merged in
-- again. A sketch is a union: merging hashes it already holds changes nothing, so this is safe
-- whether the view's part of the INSERT landed or not.
INSERT INTO ${database}.usage_unique_hourly
SELECT org_id, project_id, meter, hour, uniqCombinedState(h)
FROM ${database}.events
ARRAY JOIN unique_meters AS meter, unique_hashes AS h
WHERE ${rows}
GROUP BY org_id, project_id, meter, hour
