-- A test application's own tenant tables: boards of trip notes, and notes that point at a
-- board (the application's own table) and at a destination (the package's table). Keys
-- lead with org_id and foreign keys are composite; tenantdb_protect() checks that and turns
-- on row-level security and the grants.
CREATE TABLE IF NOT EXISTS trip_board (
    org_id      uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    title       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT trip_board_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT trip_board_org_title_key UNIQUE (org_id, title)
);
SELECT tenantdb_protect('trip_board');

CREATE TABLE IF NOT EXISTS trip_note (
    org_id          uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    board_id        uuid        NOT NULL,
    destination_id  uuid,
    body            text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT trip_note_pkey PRIMARY KEY (org_id, id),
    CONSTRAINT trip_note_board_fkey FOREIGN KEY (org_id, board_id)
        REFERENCES trip_board (org_id, id) ON DELETE CASCADE,
    CONSTRAINT trip_note_destination_fkey FOREIGN KEY (org_id, destination_id)
        REFERENCES destination (org_id, id) ON DELETE SET NULL (destination_id)
);
CREATE INDEX IF NOT EXISTS trip_note_org_created_idx ON trip_note (org_id, created_at DESC);
SELECT tenantdb_protect('trip_note');
