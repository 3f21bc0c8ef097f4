-- Verification of the daily unique-meter sketches (schema 005, read by tally-api): the distinct
-- count of each (org, project, meter, UTC day)'s daily sketch, against the same count from the
-- per-event rows (FINAL). Whole days [${day_from}, ${day_to}) that cover the period. Equal when
-- consistent: a uniqCombined sketch depends only on the set of hashes it holds.
SELECT 'sketch' AS side, org_id, project_id, meter, toUInt32(day) AS d, toUInt64(uniqCombinedMerge(state)) AS value
FROM ${database}.usage_unique_daily
WHERE day >= toDateTime(${day_from}) AND day < toDateTime(${day_to})
GROUP BY org_id, project_id, meter, d
UNION ALL
SELECT 'events' AS side, org_id, project_id, meter, intDiv(toUInt32(hour), 86400) * 86400 AS d, toUInt64(uniqCombined(u)) AS value
FROM ${database}.events FINAL
ARRAY JOIN unique_meters AS meter, unique_hashes AS u
WHERE hour >= toDateTime(${day_from}) AND hour < toDateTime(${day_to})
GROUP BY org_id, project_id, meter, d
