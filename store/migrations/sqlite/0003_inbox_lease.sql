-- Inbox claims in progress: a claim holds a lease (Unix ms) until its handler finishes;
-- `lease_until` NULL means done (claims made before this migration count as done).
-- `holder` fences a holder whose lease was taken over: its late release or completion
-- does not touch the new holder's claim.
ALTER TABLE rabbitry_inbox ADD COLUMN lease_until INTEGER;
ALTER TABLE rabbitry_inbox ADD COLUMN holder TEXT;
