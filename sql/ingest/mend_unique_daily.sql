-- The daily unique-meter sketches of the same rows (schema 005), merged in again (a union).
INSERT INTO ${database}.usage_unique_daily
SELECT org_id, project_id, meter, toDateTime(intDiv(toUInt32(hour), 86400) * 86400) AS day, uniqCombinedState(h)
FROM ${database}.events
ARRAY JOIN unique_meters AS meter, unique_hashes AS h
WHERE ${rows}
GROUP BY org_id, project_id, meter, day
