-- The change feed (docs/changes.md): every committed change of an instance as
-- stored, in the transaction that makes it, whoever writes the table.
--
-- Statement-level triggers with transition tables: one set-based INSERT per
-- statement that changed rows (a writer's whole batch), not a trigger call
-- per row. A pure re-publish (nothing but the ordering guard moved) appends
-- nothing.
CREATE TABLE status_changes (
    change_id       bigserial   PRIMARY KEY,
    kind            text        NOT NULL CHECK (kind IN ('created', 'changed', 'deleted')),
    instance_id     text        NOT NULL,
    service_type    text        NOT NULL,
    previous_status text,                  -- null for 'created'
    status          text,                  -- null for 'deleted'
    status_message  text        NOT NULL,
    outputs         jsonb,
    provider_name   text        NOT NULL,
    event_time      timestamptz,           -- of the event that set the status; null before any
    commit_time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at    timestamptz            -- set by the relay once NATS stored it
);
-- Few indexes: every change row pays for each. Readers follow the feed in
-- change-id order (the primary key) and filter as they go; the relay finds
-- what is left to publish through the partial index; retention prunes by
-- change id (commit times grow with it, see the lock below).
CREATE INDEX status_changes_unpublished_idx ON status_changes (change_id) WHERE published_at IS NULL;

-- Change ids in commit order. Sequence values are handed out when rows are
-- inserted, not when transactions commit: with two writers, ids 1-10 could
-- commit after ids 11-20, and a watcher that already read past 20 would never
-- see them. So a transaction that appends changes first takes this lock and
-- holds it to its commit: every lower id is committed before a higher one can
-- be handed out, and "after <id>" is a gap-free position. Only transactions
-- that really change something take it; their tails (append + commit) run
-- one at a time.
CREATE FUNCTION dcmstatus_changes_lock() RETURNS void
    LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock(7235, 1) $$;

-- An insert takes the lock before it touches parked_events (it appends a
-- 'created' change anyway): a writer holds the lock while it parks, and may
-- wait there for an insert that wrote the same parked key, so an insert
-- holding that key while waiting for the lock would deadlock with it.
CREATE OR REPLACE FUNCTION dcmstatus_apply_parked() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    parked parked_events%ROWTYPE;
BEGIN
    PERFORM dcmstatus_changes_lock();
    DELETE FROM instance_tombstones WHERE instance_id = NEW.instance_id;
    INSERT INTO parked_events AS p
        (instance_id, service_type, status, status_message, provider_name, event_time, stream_seq, expires_at)
    VALUES (NEW.instance_id, NEW.service_type, '', '', '', '-infinity', 0, '-infinity')
    ON CONFLICT (instance_id, service_type) DO UPDATE SET stream_seq = p.stream_seq
    RETURNING p.* INTO parked;
    DELETE FROM parked_events WHERE instance_id = NEW.instance_id AND service_type = NEW.service_type;
    -- A placeholder of our own expires at -infinity and applies nothing. A
    -- parked event applies under the same guards as any event: in time for
    -- this row (its expiry covers the TTL and the predecessor guard), and
    -- newer than a status the row is inserted with.
    IF parked.expires_at >= NEW.created_at
       AND (NEW.status_time, NEW.status_seq) < (parked.event_time, parked.stream_seq) THEN
        NEW.status := parked.status;
        NEW.status_message := parked.status_message;
        NEW.provider_name := parked.provider_name;
        NEW.outputs := COALESCE(parked.outputs, NEW.outputs);
        NEW.status_time := parked.event_time;
        NEW.status_seq := parked.stream_seq;
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION dcmstatus_changes_on_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows) THEN
        PERFORM dcmstatus_changes_lock();
        INSERT INTO status_changes
            (kind, instance_id, service_type, previous_status, status, status_message, outputs,
             provider_name, event_time)
        SELECT 'created', n.instance_id, n.service_type, NULL, n.status, n.status_message, n.outputs,
               n.provider_name, CASE WHEN isfinite(n.status_time) THEN n.status_time END
          FROM new_rows AS n ORDER BY n.instance_id;
        PERFORM pg_notify('dcmstatus_changes', '');
    END IF;
    RETURN NULL;
END
$$;

-- The transition tables carry no statistics: left alone, the planner joins
-- them with a nested loop, a million comparisons for a batch of 1000 rows.
CREATE FUNCTION dcmstatus_changes_on_update() RETURNS trigger
    LANGUAGE plpgsql SET enable_nestloop = off AS $$
BEGIN
    -- One pass over the transition tables: the lock first (cheap, and held
    -- by a writer's batch only until its commit), then the changed rows.
    IF EXISTS (SELECT 1 FROM new_rows) THEN
        PERFORM dcmstatus_changes_lock();
        INSERT INTO status_changes
            (kind, instance_id, service_type, previous_status, status, status_message, outputs,
             provider_name, event_time)
        SELECT 'changed', n.instance_id, n.service_type, o.status, n.status, n.status_message, n.outputs,
               n.provider_name, CASE WHEN isfinite(n.status_time) THEN n.status_time END
          FROM new_rows AS n JOIN old_rows AS o USING (instance_id)
         WHERE n.status IS DISTINCT FROM o.status
            OR n.status_message IS DISTINCT FROM o.status_message
            OR n.outputs IS DISTINCT FROM o.outputs
         ORDER BY n.instance_id;
        IF FOUND THEN
            PERFORM pg_notify('dcmstatus_changes', '');
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION dcmstatus_changes_on_delete() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM old_rows) THEN
        PERFORM dcmstatus_changes_lock();
        INSERT INTO status_changes
            (kind, instance_id, service_type, previous_status, status, status_message, outputs,
             provider_name, event_time)
        SELECT 'deleted', o.instance_id, o.service_type, o.status, NULL, o.status_message, o.outputs,
               o.provider_name, CASE WHEN isfinite(o.status_time) THEN o.status_time END
          FROM old_rows AS o ORDER BY o.instance_id;
        PERFORM pg_notify('dcmstatus_changes', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER dcmstatus_changes_on_insert
    AFTER INSERT ON service_type_instances REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dcmstatus_changes_on_insert();
CREATE TRIGGER dcmstatus_changes_on_update
    AFTER UPDATE ON service_type_instances REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dcmstatus_changes_on_update();
CREATE TRIGGER dcmstatus_changes_on_delete
    AFTER DELETE ON service_type_instances REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dcmstatus_changes_on_delete();
