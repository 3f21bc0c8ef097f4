-- `tally-invoicer usage`: unique meters per (org, project, meter) over [from, to), sketches merged.
SELECT org_id, project_id, meter, uniqCombinedMerge(state) AS value
FROM ${database}.usage_unique_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to}) ${org_filter}
GROUP BY org_id, project_id, meter
ORDER BY org_id, project_id, meter
