-- `tally-invoicer usage`: additive totals per (org, project, meter) in [from, to).
SELECT org_id, project_id, meter, sum(value) AS value
FROM ${database}.usage_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to}) ${org_filter}
GROUP BY org_id, project_id, meter
ORDER BY org_id, project_id, meter
