-- tenantdb 0.4: per-org "newest first" listings read only the page they return.
-- Without these, a page of 20 of an org's destinations sorts all of the org's rows, and
-- with row-level security each of them also passes through the policy's gating node
-- (measured: ~0.2 us per candidate row). Re-runnable.

CREATE INDEX IF NOT EXISTS destination_org_created_idx
    ON destination (org_id, created_at DESC);
CREATE INDEX IF NOT EXISTS knowledge_item_org_created_idx
    ON knowledge_item (org_id, created_at DESC);
