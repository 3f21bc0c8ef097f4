-- `tally-invoicer usage`: unique meters per (org, project, meter) over [from, to), sketches merged.
SELECT org_id, project_id, meter, toUInt64(0) AS value_hi, toUInt64(uniqCombinedMerge(state)) AS value_lo
FROM ${database}.usage_unique_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to}) ${org_filter}
GROUP BY org_id, project_id, meter
ORDER BY org_id, project_id, meter
