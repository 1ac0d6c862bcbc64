-- flakectl.replay v0001: repair from history (SPEC rule 11).
--
-- Recomputes the repository's flakes from the runs of the given uploads as if
-- they had been processed in order from a table with no flakes for the
-- repository (no lookback, the ledger ignored), compares them with the live
-- rows those runs determine (replay_compare), and returns the counts. A dry
-- run (the default) writes nothing. With dry_run => false: the live rows
-- without a pair move to flakectl.flake_archive (every column, id included,
-- and archived_at = now()), the replayed rows without a pair are inserted
-- (flags_id NULL), paired rows stay as they are, the uploads not yet in the
-- ledger are recorded, and every failure/error run of the repository in the
-- uploads becomes flaky_fail (marked by the state machine in the statement
-- that reads them).
--
-- No lookback and no wait argument: a repair always waits for the
-- repository's lock.
create or replace function flakectl.replay(
  repo_id bigint,
  upload_ids bigint[],
  expire_after integer default 30,
  dry_run boolean default true
) returns flakectl.replay_summary
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_custom_plan
set jit = off
as $$
#variable_conflict use_column
declare
  v_uploads bigint[];
  v_cmp record;
  v_result flakectl.replay_summary;
begin
  v_uploads := flakectl.replay_guard(replay.repo_id, replay.upload_ids, replay.expire_after, replay.dry_run);
  v_cmp := flakectl.replay_compare(replay.repo_id, v_uploads, replay.expire_after, not replay.dry_run);

  select cardinality(v_uploads)::bigint, v_cmp.testruns_considered,
         count(*) filter (where c.side = 'live'),
         count(*) filter (where c.side = 'replayed'),
         count(*) filter (where c.side = 'live' and c.paired),
         count(*) filter (where c.side = 'live' and not c.paired),
         count(*) filter (where c.side = 'replayed' and not c.paired),
         v_cmp.testruns_marked
    into v_result
    from unnest(v_cmp.compared) c;

  if replay.dry_run then
    return v_result;
  end if;

  -- archive, then delete: an open replayed row may only come in once the
  -- live open row of its test has left the one-open-flake-per-test index
  with gone as (
    delete from @codecov@.test_analytics_flake f
     using unnest(v_cmp.compared) c
     where c.side = 'live' and not c.paired
       and f.id = c.id
    returning f.id, f.repoid, f.test_id, f.flags_id, f.recent_passes_count, f.count,
              f.fail_count, f.start_date, f.end_date
  )
  insert into flakectl.flake_archive
    (id, repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date,
     archived_at)
  select g.id, g.repoid, g.test_id, g.flags_id, g.recent_passes_count, g.count, g.fail_count,
         g.start_date, g.end_date, now()
    from gone g;

  insert into @codecov@.test_analytics_flake
    (repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date)
  select replay.repo_id, c.test_id, null, c.recent_passes_count, c.count, c.fail_count,
         c.start_date, c.end_date
    from unnest(v_cmp.compared) c
   where c.side = 'replayed' and not c.paired
   order by c.test_id, c.start_date;

  -- replay ignores the ledger, but records what it replayed: a later
  -- process_* call must not count these uploads again
  insert into flakectl.processed_upload (upload_id, repo_id, commit_sha)
  select u, replay.repo_id, null
    from unnest(v_uploads) as u
  on conflict (upload_id) do nothing;

  return v_result;
end;
$$;
