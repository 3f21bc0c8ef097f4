-- `explain`: one unique meter's distinct count per (org, project) over [from, to) (sketches merged
-- across hours; per-project counts do not add up to the org's, which merges across projects).
SELECT org_id, project_id, uniqCombinedMerge(state) AS value
FROM ${database}.usage_unique_hourly
WHERE meter = ${meter} AND org_id IN (${orgs})
  AND hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id
ORDER BY org_id, project_id
