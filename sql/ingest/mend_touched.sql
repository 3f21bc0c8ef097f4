-- The (org, project, hour) of the rows that may have landed without their aggregates, when the
-- INSERT that wrote them never answered (${rows}: mend_last_attempt.sql).
SELECT org_id, project_id, hour
FROM ${database}.events
WHERE ${rows}
