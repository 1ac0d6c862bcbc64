-- flakectl.process_upload_set v0003: the set-wise state machine (SPEC rules 2-7).
--
-- Called by process_commit / process_uploads with the repository lock held
-- and the candidate uploads distinct, non-NULL and ascending.
--
-- Only the rows that can matter are read: the failure-class runs of the
-- uploads (index on upload_id, outcome) give the tests that fail; with the
-- tests that hold an open flake they are the tests that matter, and each
-- one's runs in the window are read by one descent of (repo_id, test_id,
-- timestamp), test after test.
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
-- Why the main statement has this shape (v0001 sorted every run it read,
-- spilling to disk from ~100k runs, and let the planner pick a sequential
-- scan for the passes of many tests): the runs arrive test by test, in the
-- order of the numbered test list, so the per-test order needs only small
-- in-memory sorts (an incremental sort on the test number), and the window
-- and the group aggregates stream; memory does not grow with the commit. The
-- open flake's threshold (lim0) travels with the test list for the same
-- reason: a join there would lose the order.
--
-- The changes are kept in an array between statements (not a temporary
-- table, which would churn the catalog on every call) because the writes
-- must run in order: expire old flakes before opening new ones.
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
  -- the window starts lookback before now, in UTC whatever the session's TimeZone
  v_cutoff timestamptz := (now() at time zone 'UTC' - p_lookback) at time zone 'UTC';
  v_uploads bigint[];
  v_tests bytea[];
  v_lim0 integer[];
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

  -- the tests that matter, sorted (the per-test reads then walk the index in
  -- order), each with the pass of group 0 that expires its open flake
  select coalesce(array_agg(t.test_id order by t.test_id), '{}'),
         coalesce(array_agg(greatest(p_expire_after - o.recent_passes_count, 1) order by t.test_id), '{}')
    into v_tests, v_lim0
    from (
      select r.test_id
        from @codecov@.ta_timeseries_testrun r
       where r.upload_id = any(v_uploads)
         and r.outcome in ('failure', 'error', 'flaky_fail')
         and r.repo_id = p_repo_id
         and r.timestamp >= v_cutoff
      union
      select f.test_id
        from @codecov@.test_analytics_flake f
       where f.repoid = p_repo_id
         and f.end_date is null
    ) t
    left join @codecov@.test_analytics_flake o
      on o.repoid = p_repo_id and o.test_id = t.test_id and o.end_date is null;

  with run as (
    select t.idx, t.lim0, r.upload_id, r.timestamp as ts,
           r.outcome <> 'pass' as is_fail,
           r.outcome in ('failure', 'error') as to_mark
      from unnest(v_tests, v_lim0) with ordinality as t(test_id, lim0, idx)
      cross join lateral (
        select r.upload_id, r.timestamp, r.outcome
          from @codecov@.ta_timeseries_testrun r
         where r.repo_id = p_repo_id
           and r.test_id = t.test_id
           and r.timestamp >= v_cutoff
           and r.upload_id = any(v_uploads)
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
           pass_ts[limit_k] as expire_ts
      from (
        select idx, grp,
               case when grp > 0 then p_expire_after else max(lim0) end as limit_k,
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
  )
  select coalesce(sum(c.considered), 0)::bigint,
         coalesce(sum(c.marked), 0)::bigint,
         coalesce(array_agg(row(
                   case when c.seq = 0 then t.flake_id end,
                   t.test_id,
                   (case when c.seq = 0 and t.flake_id is not null then t.count0 else 0 end + c.fails + c.passes)::integer,
                   (case when c.seq = 0 and t.flake_id is not null then t.fail_count0 else 0 end + c.fails)::integer,
                   (case when c.last_grp = 0 then t.rpc0 else 0 end + c.last_passes)::integer,
                   case when c.seq = 0 and t.flake_id is not null then t.start_date0 else c.first_fail end,
                   c.end_date
                 )::flakectl.flake_change order by t.test_id, c.seq)
                 filter (where (c.seq = 0 and t.flake_id is not null) or c.fails > 0), '{}')
    into v_result.testruns_considered, v_result.testruns_marked, v_changes
    from change c
    join (select t.idx, t.test_id, o.id as flake_id, o.count as count0,
                 o.fail_count as fail_count0, o.recent_passes_count as rpc0, o.start_date as start_date0
            from unnest(v_tests) with ordinality as t(test_id, idx)
            left join @codecov@.test_analytics_flake o
              on o.repoid = p_repo_id and o.test_id = t.test_id and o.end_date is null) t
      on t.idx = c.idx;

  select count(*) filter (where c.flake_id is null),
         count(*) filter (where c.flake_id is not null),
         count(*) filter (where c.end_date is not null)
    into v_result.flakes_created, v_result.flakes_updated, v_result.flakes_expired
    from unnest(v_changes) c;

  if p_dry_run then
    return v_result;
  end if;

  -- expire/update first: a new flake of the same test may only be inserted
  -- once the old one has left the one-open-flake-per-test index
  update @codecov@.test_analytics_flake f
     set count = c.count,
         fail_count = c.fail_count,
         recent_passes_count = c.recent_passes_count,
         end_date = c.end_date
    from unnest(v_changes) c
   where c.flake_id is not null
     and f.id = c.flake_id;

  insert into @codecov@.test_analytics_flake
    (repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date)
  select p_repo_id, c.test_id, null, c.recent_passes_count, c.count, c.fail_count,
         c.start_date, c.end_date
    from unnest(v_changes) c
   where c.flake_id is null
   order by c.test_id, c.start_date;

  update @codecov@.ta_timeseries_testrun r
     set outcome = 'flaky_fail'
   where r.upload_id = any(v_uploads)
     and r.outcome in ('failure', 'error')
     and r.repo_id = p_repo_id
     and r.timestamp >= v_cutoff;

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
