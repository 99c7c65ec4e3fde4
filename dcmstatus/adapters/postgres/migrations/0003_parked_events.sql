-- Events that beat their row, and the ids of deleted rows (docs/database.md#parked-events).
--
-- In DCM a provider's first status can reach the bus before the instance row
-- is written. Such an event is parked: the newest per (instance id, service
-- type), until `expires_at`. When a row with that id is inserted - through the
-- API or by any other writer - the BEFORE INSERT trigger below applies the
-- parked event to the new row in the same transaction.
--
-- `expires_at` is the earlier of "parked at + parking TTL" and "event time +
-- allowed clock skew": past the latter, the predecessor guard would refuse the
-- event for any row created from then on, so one column says both.
CREATE TABLE parked_events (
    instance_id   text        NOT NULL,
    service_type  text        NOT NULL,
    status        text        NOT NULL,
    status_message text       NOT NULL,
    provider_name text        NOT NULL,
    outputs       jsonb,
    event_time    timestamptz NOT NULL,
    stream_seq    bigint      NOT NULL,
    expires_at    timestamptz NOT NULL,
    -- Renumbered on every replacement, so "the newest N ids" bounds the table
    -- without counting it (see the writer's eviction).
    id            bigserial   NOT NULL UNIQUE,
    PRIMARY KEY (instance_id, service_type)
);
CREATE INDEX parked_events_expires_idx ON parked_events (expires_at);

-- A deleted row leaves its id here for as long as an event may be parked: an
-- event for a tombstoned id is the deleted instance's trailing word
-- (DELETING/DELETED after the row went), never parked, so that re-creating the
-- id cannot hand the new instance its predecessor's status.
CREATE TABLE instance_tombstones (
    instance_id text        PRIMARY KEY,
    deleted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instance_tombstones_deleted_idx ON instance_tombstones (deleted_at);

-- Closing the race between a row's insert and a writer parking an event for
-- it: each transaction is blind to the other's uncommitted write, so the
-- trigger could find nothing parked while the writer finds no row, and the
-- event would wait for a row that already exists. Both therefore write the
-- same key of parked_events, and PostgreSQL makes the second writer of a key
-- wait for the first to finish: the trigger upserts (and removes) the key,
-- which takes an event a writer committed, or waits for one being committed;
-- a writer that had to wait for an insert, or raced it, moves events whose
-- row now exists onto that row in a later statement (see the writer). No
-- advisory locks: a bulk insert of many rows must not fill the lock table.
CREATE FUNCTION dcmstatus_apply_parked() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    parked parked_events%ROWTYPE;
BEGIN
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

CREATE TRIGGER dcmstatus_apply_parked
    BEFORE INSERT ON service_type_instances
    FOR EACH ROW EXECUTE FUNCTION dcmstatus_apply_parked();

CREATE FUNCTION dcmstatus_tombstone() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO instance_tombstones (instance_id) VALUES (OLD.instance_id)
        ON CONFLICT (instance_id) DO UPDATE SET deleted_at = EXCLUDED.deleted_at;
    RETURN NULL;
END
$$;

CREATE TRIGGER dcmstatus_tombstone
    AFTER DELETE ON service_type_instances
    FOR EACH ROW EXECUTE FUNCTION dcmstatus_tombstone();
