-- flakectl.prune_ledger v0002: forget processed uploads older than an age.
--
-- The ledger (flakectl.processed_upload) gains a row per processed upload and
-- keeps it forever. A row can go once no call can reach the upload's runs
-- again: a call reads runs no older than its lookback (1 day by default), so
-- an age shorter than twice that default is refused (SQLSTATE 22023): an
-- upload pruned sooner could be processed, and counted, a second time.
-- The age is measured in UTC, like the lookback, whatever the session's
-- TimeZone. Returns the number of rows deleted.
--
--   select flakectl.prune_ledger(older_than => interval '30 days');
create or replace function flakectl.prune_ledger(
  older_than interval
) returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_older_than interval := prune_ledger.older_than;
  v_cutoff timestamptz;
  v_deleted bigint;
begin
  if v_older_than is null then
    raise exception using errcode = '22004', message = 'flakectl: argument older_than must not be NULL';
  end if;
  if v_older_than < 2 * interval '1 day' then
    raise exception using errcode = '22023',
      message = format('flakectl: argument older_than must be at least 2 days (twice the default lookback), got %s',
                       v_older_than),
      hint = 'An upload pruned sooner could be processed again and counted twice.';
  end if;

  v_cutoff := (now() at time zone 'UTC' - v_older_than) at time zone 'UTC';
  delete from flakectl.processed_upload l
   where l.processed_at < v_cutoff;
  get diagnostics v_deleted = row_count;
  return v_deleted;
end;
$$;
