-- flakectl.process_upload_set v0003: one call's uploads through the state
-- machine, then its writes (SPEC rules 2-7).
--
-- Called by process_commit / process_uploads with the repository lock held
-- and the candidate uploads distinct, non-NULL and ascending; internal (not
-- executable by PUBLIC or a worker: it trusts its arguments).
--
-- The ledger drops uploads processed before; flakectl.state_machine reads
-- the runs, computes the changes and marks the failure/error runs it read,
-- all in one statement (v0002 read and marked in separate statements, so a
-- run committed into an upload during the call could be marked without
-- being counted: issue 10, item 1). Then the flakes are written, in order:
-- expire/update first, so that a new flake of the same test is inserted only
-- once the old one has left the one-open-flake-per-test index; the UPDATE is
-- restricted to the repository's open rows, not only to the ids computed.
-- Last, the ledger.
--
-- The window starts at flakectl.window_start(lookback) (guard has checked
-- it; now() is the transaction's, so both see the same start).
create or replace function flakectl.process_upload_set(
  p_repo_id bigint,
  p_candidates bigint[],
  p_lookback interval,
  p_expire_after integer,
  p_dry_run boolean,
  p_commit_sha text
) returns flakectl.summary
language plpgsql
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_custom_plan
set jit = off
set max_parallel_workers_per_gather = 0
as $$
declare
  v_cutoff timestamptz := flakectl.window_start(p_lookback);
  v_uploads bigint[];
  v_changes flakectl.flake_change[];
  v_result flakectl.summary;
  v_detail text;
begin
  select coalesce(array_agg(c.id order by c.id) filter (where l.upload_id is null), '{}'),
         count(l.upload_id)
    into v_uploads, v_result.uploads_skipped
    from unnest(p_candidates) as c(id)
    left join flakectl.processed_upload l on l.upload_id = c.id;
  v_result.uploads_processed := cardinality(v_uploads)::bigint;

  select s.testruns_considered, s.testruns_marked, s.changes
    into v_result.testruns_considered, v_result.testruns_marked, v_changes
    from flakectl.state_machine(p_repo_id, v_uploads, v_cutoff, p_expire_after, false, not p_dry_run) s;

  select count(*) filter (where c.flake_id is null),
         count(*) filter (where c.flake_id is not null),
         count(*) filter (where c.end_date is not null)
    into v_result.flakes_created, v_result.flakes_updated, v_result.flakes_expired
    from unnest(v_changes) c;

  if p_dry_run then
    return v_result;
  end if;

  update @codecov@.test_analytics_flake f
     set count = c.count,
         fail_count = c.fail_count,
         recent_passes_count = c.recent_passes_count,
         end_date = c.end_date
    from unnest(v_changes) c
   where c.flake_id is not null
     and f.id = c.flake_id
     and f.repoid = p_repo_id
     and f.end_date is null;

  insert into @codecov@.test_analytics_flake
    (repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date)
  select p_repo_id, c.test_id, null, c.recent_passes_count, c.count, c.fail_count,
         c.start_date, c.end_date
    from unnest(v_changes) c
   where c.flake_id is null
   order by c.test_id, c.start_date;

  -- v_uploads holds no ledger row as of this call's lock, so a conflict means a
  -- call for another repository, given one of these upload ids, committed it
  -- meanwhile: skipping it now would not equal running the calls in turn
  begin
    insert into flakectl.processed_upload (upload_id, repo_id, commit_sha)
    select u, p_repo_id, p_commit_sha
      from unnest(v_uploads) as u;
  exception when unique_violation then
    get stacked diagnostics v_detail = pg_exception_detail;
    raise exception using errcode = '40001',
      message = format('flakectl: a concurrent call for another repository processed an upload of this call (%s)',
                       v_detail),
      hint = 'Retry the call: it then reports that upload as skipped.';
  end;

  return v_result;
end;
$$;
