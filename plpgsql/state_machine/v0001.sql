-- flakectl.state_machine v0001: SPEC rules 2-6 for one repository, in one
-- statement; the one copy of the state machine (process_upload_set and
-- replay call it).
--
-- Reads, in ONE statement (one snapshot, SPEC rule 5): the failure-class
-- runs of the uploads (index on upload_id, outcome) give the tests that
-- fail; with the tests that hold an open flake they are the tests that
-- matter; each one's runs are read by one descent of (repo_id, test_id,
-- timestamp), test after test. When p_mark, the same statement marks the
-- failure/error runs it read as flaky_fail (a data-modifying CTE: same
-- snapshot, so a run committed into an upload meanwhile is neither counted
-- nor marked; the UPDATE's predicate is the read's, and every failing test is
-- a test that matters, so the marked runs are exactly the failure/error runs
-- read). Returns the counters and the flake changes; writes no flake.
--
-- Arguments (trusted: the caller has checked them and holds the repo lock):
--   p_uploads       distinct, non-NULL, ascending upload ids
--   p_cutoff        runs before it are ignored ('-infinity': none)
--   p_expire_after  >= 1
--   p_from_empty    true: start from no open flake (the repository's open
--                   flakes are neither read nor continued)
--   p_mark          true: mark the failure/error runs read
-- Out: testruns_considered, testruns_marked (the failure/error runs read,
-- marked or, with p_mark false, that would be), changes: one
-- flakectl.flake_change per flake the runs touch, in (test_id, sequence)
-- order; flake_id is the open flake's id when it continues one, NULL for a
-- new flake. A value outside integer (corrupt stored counters) fails the
-- call with 22003 naming the flake; counters are computed in bigint/numeric,
-- so no intermediate overflows.
--
-- How replay (SPEC rule 11) calls it: from an empty state, no lookback,
-- every failure/error run of the repository in the uploads marked unless
-- dry:
--   select * from flakectl.state_machine(p_repo_id, v_uploads, '-infinity',
--                                        p_expire_after, true, not p_dry_run);
-- (process_upload_set: (p_repo_id, v_uploads, window start, p_expire_after,
-- false, not p_dry_run)).
--
-- The model, per test, over its runs in order (upload, timestamp, failures
-- first on ties):
--   * the g-th failure starts group g; group 0 holds the passes before the
--     first failure and belongs to the open flake, if there is one;
--   * the k-th pass of a group brings recent_passes_count to base + k, where
--     base is the open flake's count for group 0 and 0 after a failure, so a
--     group expires its flake at pass k = expire_after - base (at least 1:
--     a row that starts at or above expire_after expires on its first pass);
--     passes after that are ignored;
--   * an expired group closes the flake: the groups after it, up to and
--     including the next expiring one, form the next flake (a new row).
-- One window pass numbers the groups; a group aggregate counts each group's
-- passes and picks the expiring one by its rank; a window over the groups and
-- an aggregate fold groups into flakes; nothing iterates over rows or tests.
--
-- Why the statement has this shape: the runs arrive test by test, in the
-- order of the numbered test list (a function scan WITH ORDINALITY over the
-- sorted test array, whose order the planner knows), so the per-test order
-- needs only small in-memory sorts (an incremental sort on the test number),
-- and the window and the group aggregates stream; memory does not grow with
-- the commit. The test list is built by a MATERIALIZED CTE of the same
-- statement and handed to unnest() as an uncorrelated subquery.
-- Internal: not executable by PUBLIC or a worker.
create or replace function flakectl.state_machine(
  p_repo_id bigint,
  p_uploads bigint[],
  p_cutoff timestamptz,
  p_expire_after integer,
  p_from_empty boolean,
  p_mark boolean,
  out testruns_considered bigint,
  out testruns_marked bigint,
  out changes flakectl.flake_change[]
)
language plpgsql
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_custom_plan
set jit = off
set max_parallel_workers_per_gather = 0
as $$
declare
  v_overflow text;
begin
  with open_flake as materialized (
    select o.id, o.test_id, o.count, o.fail_count, o.recent_passes_count, o.start_date
      from @codecov@.test_analytics_flake o
     where o.repoid = p_repo_id
       and o.end_date is null
       and not p_from_empty
  ),
  test_list as materialized (
    -- the tests that matter, sorted (the per-test reads then walk the index in
    -- order), each with the pass of group 0 that expires its open flake
    select coalesce(array_agg(t.test_id order by t.test_id), '{}') as tests,
           coalesce(array_agg(greatest(p_expire_after::bigint - o.recent_passes_count, 1) order by t.test_id),
                    '{}') as lim0s
      from (
        select r.test_id
          from @codecov@.ta_timeseries_testrun r
         where r.upload_id = any(p_uploads)
           and r.outcome in ('failure', 'error', 'flaky_fail')
           and r.repo_id = p_repo_id
           and r.timestamp >= p_cutoff
        union
        select f.test_id
          from open_flake f
      ) t
      left join open_flake o on o.test_id = t.test_id
  ),
  marked as (
    update @codecov@.ta_timeseries_testrun r
       set outcome = 'flaky_fail'
     where p_mark
       and r.upload_id = any(p_uploads)
       and r.outcome in ('failure', 'error')
       and r.repo_id = p_repo_id
       and r.timestamp >= p_cutoff
  ),
  run as (
    select t.idx, t.lim0, r.upload_id, r.timestamp as ts,
           r.outcome <> 'pass' as is_fail,
           r.outcome in ('failure', 'error') as to_mark
      from unnest((select l.tests from test_list l), (select l.lim0s from test_list l))
             with ordinality as t(test_id, lim0, idx)
      cross join lateral (
        select r.upload_id, r.timestamp, r.outcome
          from @codecov@.ta_timeseries_testrun r
         where r.repo_id = p_repo_id
           and r.test_id = t.test_id
           and r.timestamp >= p_cutoff
           and r.upload_id = any(p_uploads)
           and r.outcome in ('pass', 'failure', 'error', 'flaky_fail')
        offset 0
      ) r
  ),
  numbered as (
    select idx, lim0, upload_id, ts, is_fail, to_mark,
           count(*) filter (where is_fail) over (partition by idx order by upload_id, ts, is_fail desc
                                                 rows unbounded preceding) as grp
      from run
  ),
  per_group as (
    -- the k-th pass of a group is the k-th of its passes in run order; a
    -- group of at most a test's runs in the call, so the array stays small
    select idx, grp, considered, marked, fail_ts,
           case when limit_k is null then 0 else least(pass_count, limit_k) end as passes,
           case when limit_k <= pass_count then pass_ts[limit_k::integer] end as expire_ts
      from (
        select idx, grp,
               case when grp > 0 then p_expire_after::bigint else max(lim0) end as limit_k,
               count(*) as considered,
               count(*) filter (where to_mark) as marked,
               min(ts) filter (where is_fail) as fail_ts,
               count(*) filter (where not is_fail) as pass_count,
               array_agg(ts order by upload_id, ts) filter (where not is_fail) as pass_ts
          from numbered
         group by idx, grp
      ) g
  ),
  per_flake as (
    select per_group.*,
           count(expire_ts) over (partition by idx order by grp
                                  rows between unbounded preceding and 1 preceding) as seq
      from per_group
  ),
  change as (
    select idx, seq,
           sum(considered) as considered,
           sum(marked) as marked,
           count(*) filter (where grp > 0) as fails,  -- a group after 0 opens with its failure
           sum(passes) as passes,
           max(grp) as last_grp,
           (array_agg(passes order by grp desc))[1] as last_passes,
           (array_agg(fail_ts order by grp) filter (where grp > 0))[1] as first_fail,
           max(expire_ts) as end_date
      from per_flake
     group by idx, seq
  ),
  flake as (
    -- every value in numeric: stored counters may be anything an integer holds
    select c.considered, c.marked, t.test_id, c.seq,
           (c.seq = 0 and o.id is not null) or c.fails > 0 as touched,
           case when c.seq = 0 then o.id end as flake_id,
           case when c.seq = 0 and o.id is not null then o.count else 0 end::numeric + c.fails + c.passes as count,
           case when c.seq = 0 and o.id is not null then o.fail_count else 0 end::numeric + c.fails as fail_count,
           case when c.last_grp = 0 then o.recent_passes_count else 0 end::numeric + c.last_passes
             as recent_passes_count,
           case when c.seq = 0 and o.id is not null then o.start_date else c.first_fail end as start_date,
           c.end_date
      from change c
      join unnest((select l.tests from test_list l)) with ordinality as t(test_id, idx) on t.idx = c.idx
      left join open_flake o on o.test_id = t.test_id
  )
  select coalesce(sum(f.considered), 0)::bigint,
         coalesce(sum(f.marked), 0)::bigint,
         coalesce(array_agg(row(f.flake_id, f.test_id, f.count::integer, f.fail_count::integer,
                                f.recent_passes_count::integer, f.start_date, f.end_date
                            )::flakectl.flake_change order by f.test_id, f.seq)
                  filter (where f.touched
                            and f.count between -2147483648 and 2147483647
                            and f.fail_count between -2147483648 and 2147483647
                            and f.recent_passes_count between -2147483648 and 2147483647), '{}'),
         min(format('%s (test \x%s): count %s, fail_count %s, recent_passes_count %s',
                    coalesce('flake ' || f.flake_id, 'a new flake'), encode(f.test_id, 'hex'),
                    f.count, f.fail_count, f.recent_passes_count))
           filter (where f.touched
                     and not (f.count between -2147483648 and 2147483647
                              and f.fail_count between -2147483648 and 2147483647
                              and f.recent_passes_count between -2147483648 and 2147483647))
    into testruns_considered, testruns_marked, changes, v_overflow
    from flake f;

  if v_overflow is not null then
    raise exception using errcode = '22003',
      message = format('flakectl: a counter of %s does not fit integer; nothing was changed', v_overflow),
      hint = 'The stored counters of that flake are corrupt: correct or close the row, then call again.';
  end if;
end;
$$;
