-- Distinct counts of unique meters per org over the whole period (sketches merged across hours
-- and projects, never summed).
SELECT org_id, meter, uniqCombinedMerge(state) AS value
FROM ${database}.usage_unique_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, meter
ORDER BY org_id, meter
