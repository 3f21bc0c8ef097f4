-- Verification, side 2: the same figures recomputed from the per-event rows (FINAL: one row per
-- distinct event even before background merges).
SELECT org_id, project_id, meter, toUInt32(hour) AS h, sum(v) AS value
FROM ${database}.events FINAL
ARRAY JOIN meters AS meter, meter_values AS v
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, meter, h
UNION ALL
SELECT org_id, project_id, meter, toUInt32(hour) AS h, toUInt64(uniqCombined(u)) AS value
FROM ${database}.events FINAL
ARRAY JOIN unique_meters AS meter, unique_hashes AS u
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, meter, h
