-- Verification, side 1b: what the unique-meter aggregates say per (org, project, meter, hour): the
-- distinct count of the hour's merged sketch.
SELECT org_id, project_id, meter, toUInt32(hour) AS h, toUInt64(0) AS value_hi, toUInt64(uniqCombinedMerge(state)) AS value_lo
FROM ${database}.usage_unique_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, meter, h
