-- Verification, side 1: what the aggregates say per (org, project, meter, hour); additive meters
-- as exact sums, unique meters as the distinct count of the hour's merged sketch.
SELECT org_id, project_id, meter, toUInt32(hour) AS h, sum(value) AS value
FROM ${database}.usage_hourly_agg
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, meter, h
UNION ALL
SELECT org_id, project_id, meter, toUInt32(hour) AS h, toUInt64(uniqCombinedMerge(state)) AS value
FROM ${database}.usage_unique_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, meter, h
