-- An offer of several free slots at once (kojin_pg/transport/offers.py). With one slot per
-- offer, a consumer that keeps its queue drained made one offer statement per message handed
-- to it; now it offers every free prefetch slot it has (open_slots), each publish fills one,
-- and it offers again only when all are filled. Publishes take the live offer served longest
-- ago (served_at, set by each take and each new offer), so idle consumers are served in turn,
-- as Redis serves blocked BRPOPs, and not all by the first offer found.
--
-- An offer is open while its token is set and open_slots > 0. A publish of this version counts
-- open_slots down and clears the token with the last slot, so a publish of the version before
-- (which takes any offer with a token, and clears it) never takes a used-up offer; the slot it
-- fills is counted when the consumer withdraws the offer (see withdraw_offer). A consumer of
-- the version before sets no open_slots: publishes of this version skip its offers, and it gets
-- their messages by the ordinary path (an announcement and a claim).
ALTER TABLE {schema}.offers
    ADD COLUMN open_slots int NOT NULL DEFAULT 0,
    ADD COLUMN served_at timestamptz NOT NULL DEFAULT now();
