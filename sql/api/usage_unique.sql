-- `GET /v1/usage`, unique meters: sketches merged per (org, project or '', meter, window start)
-- over [from, to) — distinct counts are merged, never summed (approximate, ≤ 2 % error).
-- Whole UTC days [${day_from}, ${day_to}) come from the daily sketches, the hours before and
-- after them from the hourly ones (with window=hour, day_from = day_to = from: hourly only).
-- Daily rows stand at their day's start, so ${window} (day, month or none) buckets them alike.
SELECT org_id, ${project} AS project, meter, ${window} AS window_start,
       toUInt64(0) AS value_hi, toUInt64(uniqCombinedMerge(state)) AS value_lo
FROM
(
    SELECT org_id, project_id, meter, hour, state
    FROM ${database}.usage_unique_hourly
    WHERE ((hour >= toDateTime(${from}) AND hour < toDateTime(${day_from}))
        OR (hour >= toDateTime(${day_to}) AND hour < toDateTime(${to}))) ${filters}
    UNION ALL
    SELECT org_id, project_id, meter, day AS hour, state
    FROM ${database}.usage_unique_daily
    WHERE day >= toDateTime(${day_from}) AND day < toDateTime(${day_to}) ${filters}
)
GROUP BY org_id, project, meter, window_start
ORDER BY org_id, project, meter, window_start
