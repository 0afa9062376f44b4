-- tenantdb 0.1: the initial schema.
-- Conventions (DESIGN.md): every tenant table carries org_id NOT NULL and has the primary
-- key (org_id, id); every foreign key between tenant tables is composite, so a row can never
-- point at another org's row; every unique key includes org_id. Re-runnable: pyway records
-- history in a separate transaction, so a crash between the two re-runs this file.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS org (
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    name        text        NOT NULL,
    slug        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT org_pkey PRIMARY KEY (id),
    CONSTRAINT org_slug_key UNIQUE (slug),
    CONSTRAINT org_slug_format CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$')
);

-- "user" is a reserved word in PostgreSQL; app_user avoids quoting it everywhere.
CREATE TABLE IF NOT EXISTS app_user (
    org_id        uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    email         text        NOT NULL,
    display_name  text,
    role          text        NOT NULL DEFAULT 'member',
    password_hash text,
    is_active     boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT app_user_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT app_user_org_email_key UNIQUE (org_id, email),
    CONSTRAINT app_user_role_check CHECK (role IN ('owner', 'admin', 'member'))
);

CREATE TABLE IF NOT EXISTS refresh_token (
    org_id      uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_id     uuid        NOT NULL,
    token_hash  text        NOT NULL,
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT refresh_token_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT refresh_token_org_token_hash_key UNIQUE (org_id, token_hash),
    CONSTRAINT refresh_token_user_fkey FOREIGN KEY (org_id, user_id)
        REFERENCES app_user (org_id, id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS refresh_token_org_user_idx ON refresh_token (org_id, user_id);
CREATE INDEX IF NOT EXISTS refresh_token_expires_at_idx ON refresh_token (expires_at);

CREATE TABLE IF NOT EXISTS destination (
    org_id      uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    name        text        NOT NULL,
    country     text,
    description text,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT destination_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT destination_org_name_key UNIQUE (org_id, name)
);

CREATE TABLE IF NOT EXISTS knowledge_item (
    org_id          uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    destination_id  uuid,
    title           text        NOT NULL,
    content         text        NOT NULL,
    source_url      text,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT knowledge_item_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT knowledge_item_destination_fkey FOREIGN KEY (org_id, destination_id)
        REFERENCES destination (org_id, id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS knowledge_item_org_destination_idx
    ON knowledge_item (org_id, destination_id);

CREATE TABLE IF NOT EXISTS embedding (
    org_id             uuid         NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id                 uuid         NOT NULL DEFAULT gen_random_uuid(),
    knowledge_item_id  uuid         NOT NULL,
    chunk_index        integer      NOT NULL DEFAULT 0,
    content            text         NOT NULL,
    vector             vector(1536) NOT NULL,
    model              text         NOT NULL,
    created_at         timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT embedding_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT embedding_org_item_chunk_key UNIQUE (org_id, knowledge_item_id, chunk_index),
    CONSTRAINT embedding_chunk_index_check CHECK (chunk_index >= 0),
    CONSTRAINT embedding_knowledge_item_fkey FOREIGN KEY (org_id, knowledge_item_id)
        REFERENCES knowledge_item (org_id, id) ON DELETE CASCADE
);

CREATE TABLE IF NOT EXISTS agent_run (
    org_id         uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id             uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_id        uuid        NOT NULL,
    status         text        NOT NULL DEFAULT 'queued',
    intent         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    plan_snapshot  jsonb,
    tool_log       jsonb,
    error          text,
    started_at     timestamptz,
    finished_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agent_run_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT agent_run_status_check
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT agent_run_user_fkey FOREIGN KEY (org_id, user_id)
        REFERENCES app_user (org_id, id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS agent_run_org_user_created_idx
    ON agent_run (org_id, user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS agent_run_created_at_idx ON agent_run (created_at);
-- Retention scrubs tool logs after a day: index only the rows that still carry one.
CREATE INDEX IF NOT EXISTS agent_run_tool_log_created_at_idx
    ON agent_run (created_at) WHERE tool_log IS NOT NULL;

CREATE TABLE IF NOT EXISTS itinerary (
    org_id          uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_id         uuid        NOT NULL,
    agent_run_id    uuid,
    destination_id  uuid,
    title           text        NOT NULL,
    status          text        NOT NULL DEFAULT 'draft',
    data            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    start_date      date,
    end_date        date,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT itinerary_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT itinerary_status_check CHECK (status IN ('draft', 'final', 'archived')),
    CONSTRAINT itinerary_dates_check
        CHECK (start_date IS NULL OR end_date IS NULL OR start_date <= end_date),
    CONSTRAINT itinerary_user_fkey FOREIGN KEY (org_id, user_id)
        REFERENCES app_user (org_id, id) ON DELETE CASCADE,
    -- Runs are purged after 30 days, itineraries kept for 90: purging a run only clears the
    -- link (the column list keeps org_id, which is NOT NULL, out of SET NULL; PostgreSQL 15+).
    CONSTRAINT itinerary_agent_run_fkey FOREIGN KEY (org_id, agent_run_id)
        REFERENCES agent_run (org_id, id) ON DELETE SET NULL (agent_run_id),
    CONSTRAINT itinerary_destination_fkey FOREIGN KEY (org_id, destination_id)
        REFERENCES destination (org_id, id) ON DELETE SET NULL (destination_id)
);
CREATE INDEX IF NOT EXISTS itinerary_org_user_created_idx
    ON itinerary (org_id, user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS itinerary_created_at_idx ON itinerary (created_at);
CREATE INDEX IF NOT EXISTS itinerary_org_agent_run_idx ON itinerary (org_id, agent_run_id);

-- The key is unique per (org, user), not globally: a global key lets one tenant's key
-- collide with, or replay, another's.
CREATE TABLE IF NOT EXISTS idempotency_key (
    org_id           uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    user_id          uuid        NOT NULL,
    key              text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending',
    body_hash        text        NOT NULL,
    headers_hash     text        NOT NULL DEFAULT '',
    response_status  integer,
    response_body    jsonb,
    locked_until     timestamptz,
    ttl_until        timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_key_pkey PRIMARY KEY (org_id, user_id, key),
    CONSTRAINT idempotency_key_status_check CHECK (status IN ('pending', 'completed', 'error')),
    CONSTRAINT idempotency_key_key_check
        CHECK (char_length(key) BETWEEN 1 AND 255 AND key ~ '^[\x20-\x7e]+$'),
    CONSTRAINT idempotency_key_user_fkey FOREIGN KEY (org_id, user_id)
        REFERENCES app_user (org_id, id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idempotency_key_ttl_until_idx ON idempotency_key (ttl_until);
