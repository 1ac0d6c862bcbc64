-- flakectl.replay_compare v0001: the comparison of SPEC rule 11 (internal).
--
-- Called by replay and replay_rows with the repository lock held and the
-- uploads distinct, non-NULL and ascending. R comes from the shared state
-- machine (the one process_* use) run from an empty state, without lookback
-- and ignoring the ledger; with p_mark it also marks the failure/error runs it
-- read. T0 is the earliest timestamp of the repository's runs, of any outcome,
-- in the uploads; L holds the repository's rows starting at or after T0 and
-- its open rows of a test with a row in R.
--
-- L and R are compared as multisets, set-wise: each side numbers its rows
-- within their group of equal compared columns (test_id, count, fail_count,
-- recent_passes_count, start_date, end_date; flags_id is not compared), and
-- a full join on the columns and that number pairs the k-th live row of a
-- group with the k-th replayed one: min(|L group|, |R group|) pairs, one to
-- one. Live rows are numbered by id, so the lowest ids are the ones paired.
-- end_date is joined as (is null, coalesce(end_date, epoch)): two NULLs are
-- equal, a NULL never equals a date, and the clauses stay hashable (a full
-- join accepts no IS NOT DISTINCT FROM).
--
-- Returns every row of L and R, each with `paired`, in one array: the
-- callers count them and write the unpaired ones.
create or replace function flakectl.replay_compare(
  p_repo_id bigint,
  p_uploads bigint[],
  p_expire_after integer,
  p_mark boolean,
  out testruns_considered bigint,
  out testruns_marked bigint,
  out compared flakectl.replay_row[]
)
language plpgsql
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_custom_plan
set jit = off
set max_parallel_workers_per_gather = 0
as $$
declare
  v_changes flakectl.flake_change[];
  v_t0 timestamptz;
begin
  select m.testruns_considered, m.testruns_marked, m.changes
    into testruns_considered, testruns_marked, v_changes
    from flakectl.state_machine(p_repo_id, p_uploads, '-infinity', p_expire_after, true, p_mark) m;

  select min(r.timestamp)
    into v_t0
    from @codecov@.ta_timeseries_testrun r
   where r.upload_id = any(p_uploads)
     and r.repo_id = p_repo_id;

  with r as (
    select c.test_id, c.count, c.fail_count, c.recent_passes_count, c.start_date, c.end_date,
           row_number() over (partition by c.test_id, c.count, c.fail_count, c.recent_passes_count,
                                           c.start_date, c.end_date) as rk
      from unnest(v_changes) c
  ),
  l as (
    select f.id, f.test_id, f.flags_id, f.count, f.fail_count, f.recent_passes_count,
           f.start_date, f.end_date,
           row_number() over (partition by f.test_id, f.count, f.fail_count, f.recent_passes_count,
                                           f.start_date, f.end_date
                              order by f.id) as rk
      from @codecov@.test_analytics_flake f
     where f.repoid = p_repo_id
       and (f.start_date >= v_t0
            or (f.end_date is null and f.test_id in (select r.test_id from r)))
  ),
  pairs as (
    select l.id as live_id, l.test_id as l_test_id, l.flags_id, l.count as l_count,
           l.fail_count as l_fail_count, l.recent_passes_count as l_rpc,
           l.start_date as l_start, l.end_date as l_end,
           r.test_id as r_test_id, r.count as r_count, r.fail_count as r_fail_count,
           r.recent_passes_count as r_rpc, r.start_date as r_start, r.end_date as r_end,
           l.rk is not null and r.rk is not null as paired
      from l
      full join r
        on l.test_id = r.test_id
       and l.count = r.count
       and l.fail_count = r.fail_count
       and l.recent_passes_count = r.recent_passes_count
       and l.start_date = r.start_date
       and (l.end_date is null) = (r.end_date is null)
       and coalesce(l.end_date, 'epoch') = coalesce(r.end_date, 'epoch')
       and l.rk = r.rk
  )
  select coalesce(array_agg(x.row order by x.row), '{}')
    into compared
    from (
      select row('live', p.paired, p.live_id, p.l_test_id, p.flags_id, p.l_count, p.l_fail_count,
                 p.l_rpc, p.l_start, p.l_end)::flakectl.replay_row as row
        from pairs p
       where p.live_id is not null
      union all
      select row('replayed', p.paired, null, p.r_test_id, null, p.r_count, p.r_fail_count,
                 p.r_rpc, p.r_start, p.r_end)::flakectl.replay_row
        from pairs p
       where p.r_test_id is not null
    ) x;
end;
$$;
