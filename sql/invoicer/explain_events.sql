-- `explain --events`: the events behind one hour of one meter, one page in the events table's own
-- order (its ORDER BY is the dedupe key, so FINAL gives each event once), after a cursor.
-- `${arrays}` pairs the meter names with their values (additive) or user hashes (unique).
SELECT org_id, project_id, event_id, type, toUInt32(ts), v
FROM ${database}.events FINAL
ARRAY JOIN ${arrays}
WHERE m = ${meter} AND org_id IN (${orgs}) AND hour = toDateTime(${hour}) ${project_filter}
  AND (org_id > ${after_org} OR (org_id = ${after_org} AND (project_id > ${after_project}
       OR (project_id = ${after_project} AND event_id > ${after_event}))))
ORDER BY org_id, project_id, event_id
LIMIT ${limit}
