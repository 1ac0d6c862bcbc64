-- flakectl.prune_ledger v0002: forget processed uploads older than an age.
--
-- The ledger (flakectl.processed_upload) gains a row per processed upload and
-- keeps it forever. A row can go once no call can reach the upload's runs
-- again: a call reads runs no older than its lookback (1 day by default), so
-- an age shorter than twice that default is refused (SQLSTATE 22023): an
-- upload pruned sooner could be processed, and counted, a second time.
-- Returns the number of rows deleted.
--
-- v0002 (issue 10): the age is judged by the cut-off it gives at call time,
-- in UTC, as a lookback is (flakectl.window_start): it must lie at least 2
-- days before now(). v0001 compared the interval with '2 days', so
-- '1 mon -28 days' on 1 March of a non-leap year passed the check and put
-- the cut-off at now(), deleting the whole ledger. An age reaching past the
-- earliest timestamp deletes nothing (no row is that old). DBA only: not
-- executable by PUBLIC or a worker.
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
  v_cutoff := flakectl.window_start(v_older_than);
  if v_cutoff is null or v_cutoff > (now() at time zone 'UTC' - interval '2 days') at time zone 'UTC' then
    raise exception using errcode = '22023',
      message = format('flakectl: argument older_than must be at least 2 days (twice the default lookback), got %s',
                       v_older_than),
      hint = 'An upload pruned sooner could be processed again and counted twice.';
  end if;

  delete from flakectl.processed_upload l
   where l.processed_at < v_cutoff;
  get diagnostics v_deleted = row_count;
  return v_deleted;
end;
$$;
