-- `GET /v1/usage`, unique meters: hourly sketches merged per (org, project or '', meter, window
-- start) over [from, to) — distinct counts are merged, never summed (approximate, ≤ 2 % error).
SELECT org_id, ${project} AS project, meter, ${window} AS window_start,
       toUInt64(0) AS value_hi, toUInt64(uniqCombinedMerge(state)) AS value_lo
FROM ${database}.usage_unique_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to}) ${filters}
GROUP BY org_id, project, meter, window_start
ORDER BY org_id, project, meter, window_start
