-- The instances whose status dcmstatus keeps current, and the dead letters.
CREATE TABLE service_type_instances (
    instance_id    text PRIMARY KEY,
    service_type   text        NOT NULL,
    name           text        NOT NULL DEFAULT '',
    agent_name     text        NOT NULL DEFAULT '',
    provider_name  text        NOT NULL DEFAULT '',
    spec           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status         text        NOT NULL DEFAULT 'PROVISIONING',
    status_message text        NOT NULL DEFAULT '',
    outputs        jsonb,
    -- The ordering guard: the event that set the status (event time, then
    -- stream sequence). '-infinity'/0 lets the first event win without NULL logic.
    status_time    timestamptz NOT NULL DEFAULT '-infinity',
    status_seq     bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Keyset pagination and filters of the list endpoint.
CREATE INDEX service_type_instances_type_idx ON service_type_instances (service_type, instance_id);
CREATE INDEX service_type_instances_status_idx ON service_type_instances (status, instance_id);

CREATE TABLE rejected_events (
    id            bigserial   PRIMARY KEY,
    reason        text        NOT NULL,
    detail        text        NOT NULL,
    subject       text        NOT NULL,
    stream_seq    bigint      NOT NULL,
    headers       jsonb,
    body          bytea       NOT NULL,
    service_type  text,
    instance_id   text,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rejected_events_reason_idx ON rejected_events (reason, id);
