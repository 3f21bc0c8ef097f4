-- Additive meters of every (org, project, hour) the rows of ${touched} fall in: the ledger's
-- exact sum (events FINAL: one row per distinct event) beside the aggregate's, where they differ.
-- Positive differences are the contributions of rows that landed without their view parts (a
-- ClickHouse server crash between the parts of one INSERT); the worker inserts them.
SELECT org_id, project_id, meter, toUInt32(hour) AS h, truth, have
FROM
(
    SELECT org_id, project_id, meter, hour, sum(v) AS truth
    FROM ${database}.events FINAL
    ARRAY JOIN meters AS meter, meter_values AS v
    WHERE (org_id, project_id, hour) IN (${touched})
    GROUP BY org_id, project_id, meter, hour
) AS ledger
ANY LEFT JOIN
(
    SELECT org_id, project_id, meter, hour, sum(value) AS have
    FROM ${database}.usage_hourly_agg
    WHERE (org_id, project_id, hour) IN (${touched})
    GROUP BY org_id, project_id, meter, hour
) AS agg USING (org_id, project_id, meter, hour)
WHERE truth != have
