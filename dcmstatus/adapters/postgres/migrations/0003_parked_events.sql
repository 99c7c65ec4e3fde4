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

-- One lock key per instance id, shared by the insert trigger and the writer's
-- parking: without it, a row inserted while a writer parks an event for it
-- would see no parked event, and the writer would see no row (each
-- transaction blind to the other's uncommitted write): the event would wait
-- for a row that already exists.
CREATE FUNCTION dcmstatus_instance_lock_key(instance_id text) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT hashtextextended(instance_id, 7235) $$;

CREATE FUNCTION dcmstatus_apply_parked() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    parked parked_events%ROWTYPE;
BEGIN
    PERFORM pg_advisory_xact_lock(dcmstatus_instance_lock_key(NEW.instance_id));
    DELETE FROM instance_tombstones WHERE instance_id = NEW.instance_id;
    DELETE FROM parked_events AS p
     WHERE p.instance_id = NEW.instance_id
       AND p.service_type = NEW.service_type
       AND p.expires_at >= NEW.created_at
    RETURNING * INTO parked;
    -- Under the same ordering guard as any event: a row inserted with a status
    -- of its own keeps it unless the parked event is newer.
    IF FOUND AND (NEW.status_time, NEW.status_seq) < (parked.event_time, parked.stream_seq) THEN
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
