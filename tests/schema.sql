CREATE SCHEMA flakectl;

CREATE TYPE flakectl.flake_change AS (
	flake_id bigint,
	test_id bytea,
	count integer,
	fail_count integer,
	recent_passes_count integer,
	start_date timestamp with time zone,
	end_date timestamp with time zone
);

CREATE TYPE flakectl.replay_row AS (
	side text,
	paired boolean,
	id bigint,
	test_id bytea,
	flags_id bytea,
	count integer,
	fail_count integer,
	recent_passes_count integer,
	start_date timestamp with time zone,
	end_date timestamp with time zone
);

CREATE TYPE flakectl.replay_summary AS (
	uploads_replayed bigint,
	testruns_considered bigint,
	flakes_live bigint,
	flakes_replayed bigint,
	flakes_identical bigint,
	flakes_archived bigint,
	flakes_inserted bigint,
	testruns_marked bigint
);

CREATE TYPE flakectl.summary AS (
	uploads_processed bigint,
	uploads_skipped bigint,
	testruns_considered bigint,
	flakes_created bigint,
	flakes_updated bigint,
	flakes_expired bigint,
	testruns_marked bigint
);

CREATE FUNCTION flakectl.guard(p_repo_id bigint, p_lookback interval, p_expire_after integer, p_dry_run boolean, p_wait boolean) RETURNS void
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_isolation text := current_setting('transaction_isolation');
begin
  if p_repo_id is null then
    raise exception using errcode = '22004', message = 'flakectl: argument repo_id must not be NULL';
  end if;
  if p_lookback is null then
    raise exception using errcode = '22004', message = 'flakectl: argument lookback must not be NULL';
  end if;
  if p_expire_after is null then
    raise exception using errcode = '22004', message = 'flakectl: argument expire_after must not be NULL';
  end if;
  if p_dry_run is null then
    raise exception using errcode = '22004', message = 'flakectl: argument dry_run must not be NULL';
  end if;
  if p_wait is null then
    raise exception using errcode = '22004', message = 'flakectl: argument wait must not be NULL';
  end if;
  if p_repo_id not between -2147483648 and 2147483647 then
    raise exception using errcode = '22003',
      message = format('flakectl: argument repo_id must be within integer (the range of test_analytics_flake.repoid), got %s',
                       p_repo_id);
  end if;
  if flakectl.window_start(p_lookback) is null then
    raise exception using errcode = '22023',
      message = format('flakectl: argument lookback must not be negative, got %s', p_lookback);
  end if;
  if p_expire_after < 1 then
    raise exception using errcode = '22023',
      message = format('flakectl: argument expire_after must be at least 1, got %s', p_expire_after);
  end if;
  if v_isolation in ('repeatable read', 'serializable') then
    raise exception using errcode = '0A000',
      message = format('flakectl: refusing to run under %s isolation: its snapshot predates the repository lock, '
                       'so the previous call''s writes would be invisible; use READ COMMITTED', upper(v_isolation)),
      hint = 'Run the call in a READ COMMITTED transaction (PostgreSQL''s default).';
  end if;

  if p_wait then
    perform pg_advisory_xact_lock(1718381411, p_repo_id::integer);
  elsif not pg_try_advisory_xact_lock(1718381411, p_repo_id::integer) then
    raise exception using errcode = '55P03',
      message = format('flakectl: repository %s is being processed by another call', p_repo_id),
      hint = 'Retry later, or call with wait => true to queue behind it.';
  end if;
end;
$$;

CREATE FUNCTION flakectl.process_commit(repo_id bigint, commit_sha text, lookback interval DEFAULT '1 day'::interval, expire_after integer DEFAULT 30, dry_run boolean DEFAULT false, wait boolean DEFAULT true) RETURNS flakectl.summary
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    SET jit TO 'off'
    AS $$
#variable_conflict use_column
declare
  v_repo_id bigint := process_commit.repo_id;
  v_commit_sha text := process_commit.commit_sha;
  v_candidates bigint[];
  v_lock_timeout text := current_setting('lock_timeout');
  v_result flakectl.summary;
  v_message text;
begin
  -- NULL checks in parameter order, so that with several NULLs the first is named
  -- (v0001 named commit_sha before repo_id)
  if process_commit.repo_id is null then
    raise exception using errcode = '22004', message = 'flakectl: argument repo_id must not be NULL';
  end if;
  if v_commit_sha is null then
    raise exception using errcode = '22004', message = 'flakectl: argument commit_sha must not be NULL';
  end if;
  perform flakectl.guard(v_repo_id, process_commit.lookback, process_commit.expire_after,
                         process_commit.dry_run, process_commit.wait);

  -- wait => false: no lock wait at all (SPEC rule 8): the repository's lock was
  -- tried above; every other lock (another call's ledger row, a flake or run
  -- row, a relation locked by DDL) fails at once with 55P03 through a
  -- lock_timeout set for the call only (undone with the block on error,
  -- restored on return)
  begin
    if not process_commit.wait then
      perform set_config('lock_timeout', '1ms', true);
    end if;
    select coalesce(array_agg(distinct u.id order by u.id), '{}')
      into v_candidates
      from public.commits c
      join public.reports_commitreport r on r.commit_id = c.id
      join public.reports_upload u on u.report_id = r.id
     where c.repoid = v_repo_id
       and c.commitid = v_commit_sha
       and r.report_type = 'test_results'
       and u.state = 'processed';

    v_result := flakectl.process_upload_set(v_repo_id, v_candidates, process_commit.lookback,
                                            process_commit.expire_after, process_commit.dry_run, v_commit_sha);
  exception when lock_not_available then
    if process_commit.wait then
      raise;
    end if;
    get stacked diagnostics v_message = message_text;
    raise exception using errcode = '55P03',
      message = format('flakectl: repository %s: wait => false, and a lock this call needs is held by another '
                       'transaction (%s); nothing was changed', v_repo_id, v_message),
      hint = 'Retry later, or call with wait => true to queue behind it.';
  end;
  if not process_commit.wait then
    perform set_config('lock_timeout', v_lock_timeout, true);
  end if;
  return v_result;
end;
$$;

CREATE FUNCTION flakectl.process_upload_set(p_repo_id bigint, p_candidates bigint[], p_lookback interval, p_expire_after integer, p_dry_run boolean, p_commit_sha text) RETURNS flakectl.summary
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    SET jit TO 'off'
    SET max_parallel_workers_per_gather TO '0'
    AS $$
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

  update public.test_analytics_flake f
     set count = c.count,
         fail_count = c.fail_count,
         recent_passes_count = c.recent_passes_count,
         end_date = c.end_date
    from unnest(v_changes) c
   where c.flake_id is not null
     and f.id = c.flake_id
     and f.repoid = p_repo_id
     and f.end_date is null;

  insert into public.test_analytics_flake
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

CREATE FUNCTION flakectl.process_uploads(repo_id bigint, upload_ids bigint[], lookback interval DEFAULT '1 day'::interval, expire_after integer DEFAULT 30, dry_run boolean DEFAULT false, wait boolean DEFAULT true) RETURNS flakectl.summary
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    SET jit TO 'off'
    AS $$
#variable_conflict use_column
declare
  v_candidates bigint[];
  v_lock_timeout text := current_setting('lock_timeout');
  v_result flakectl.summary;
  v_message text;
begin
  -- NULL checks in parameter order, so that with several NULLs the first is named
  -- (v0001 named upload_ids before repo_id)
  if process_uploads.repo_id is null then
    raise exception using errcode = '22004', message = 'flakectl: argument repo_id must not be NULL';
  end if;
  if process_uploads.upload_ids is null then
    raise exception using errcode = '22004', message = 'flakectl: argument upload_ids must not be NULL';
  end if;
  perform flakectl.guard(process_uploads.repo_id, process_uploads.lookback, process_uploads.expire_after,
                         process_uploads.dry_run, process_uploads.wait);

  -- wait => false: no lock wait at all (SPEC rule 8): the repository's lock was
  -- tried above; every other lock (another call's ledger row, a flake or run
  -- row, a relation locked by DDL) fails at once with 55P03 through a
  -- lock_timeout set for the call only (undone with the block on error,
  -- restored on return)
  begin
    if not process_uploads.wait then
      perform set_config('lock_timeout', '1ms', true);
    end if;
    select coalesce(array_agg(distinct u order by u), '{}')
      into v_candidates
      from unnest(process_uploads.upload_ids) as u
     where u is not null;

    v_result := flakectl.process_upload_set(process_uploads.repo_id, v_candidates, process_uploads.lookback,
                                            process_uploads.expire_after, process_uploads.dry_run, null);
  exception when lock_not_available then
    if process_uploads.wait then
      raise;
    end if;
    get stacked diagnostics v_message = message_text;
    raise exception using errcode = '55P03',
      message = format('flakectl: repository %s: wait => false, and a lock this call needs is held by another '
                       'transaction (%s); nothing was changed', process_uploads.repo_id, v_message),
      hint = 'Retry later, or call with wait => true to queue behind it.';
  end;
  if not process_uploads.wait then
    perform set_config('lock_timeout', v_lock_timeout, true);
  end if;
  return v_result;
end;
$$;

CREATE FUNCTION flakectl.prune_ledger(older_than interval) RETURNS bigint
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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

CREATE FUNCTION flakectl.replay(repo_id bigint, upload_ids bigint[], expire_after integer DEFAULT 30, dry_run boolean DEFAULT true) RETURNS flakectl.replay_summary
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    SET jit TO 'off'
    AS $$
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
    delete from public.test_analytics_flake f
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

  insert into public.test_analytics_flake
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

CREATE FUNCTION flakectl.replay_compare(p_repo_id bigint, p_uploads bigint[], p_expire_after integer, p_mark boolean, OUT testruns_considered bigint, OUT testruns_marked bigint, OUT compared flakectl.replay_row[]) RETURNS record
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    SET jit TO 'off'
    SET max_parallel_workers_per_gather TO '0'
    AS $$
declare
  v_changes flakectl.flake_change[];
  v_t0 timestamptz;
begin
  select m.testruns_considered, m.testruns_marked, m.changes
    into testruns_considered, testruns_marked, v_changes
    from flakectl.state_machine(p_repo_id, p_uploads, '-infinity', p_expire_after, true, p_mark) m;

  select min(r.timestamp)
    into v_t0
    from public.ta_timeseries_testrun r
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
      from public.test_analytics_flake f
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

CREATE FUNCTION flakectl.replay_guard(p_repo_id bigint, p_upload_ids bigint[], p_expire_after integer, p_dry_run boolean) RETURNS bigint[]
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
begin
  if p_repo_id is null then
    raise exception using errcode = '22004', message = 'flakectl: argument repo_id must not be NULL';
  end if;
  if p_upload_ids is null then
    raise exception using errcode = '22004', message = 'flakectl: argument upload_ids must not be NULL';
  end if;
  perform flakectl.guard(p_repo_id, interval '0', p_expire_after, p_dry_run, true);
  return (select coalesce(array_agg(distinct u order by u), '{}')
            from unnest(p_upload_ids) as u
           where u is not null);
end;
$$;

CREATE FUNCTION flakectl.replay_rows(repo_id bigint, upload_ids bigint[], expire_after integer DEFAULT 30) RETURNS SETOF flakectl.replay_row
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    SET jit TO 'off'
    AS $$
#variable_conflict use_column
declare
  v_uploads bigint[];
  v_cmp record;
begin
  v_uploads := flakectl.replay_guard(replay_rows.repo_id, replay_rows.upload_ids,
                                     replay_rows.expire_after, false);
  v_cmp := flakectl.replay_compare(replay_rows.repo_id, v_uploads, replay_rows.expire_after, false);
  return query
    select c.*
      from unnest(v_cmp.compared) c
     where c.test_id in (select d.test_id from unnest(v_cmp.compared) d where not d.paired)
     order by c.test_id, c.start_date, c.side, c.id;
end;
$$;

CREATE FUNCTION flakectl.state_machine(p_repo_id bigint, p_uploads bigint[], p_cutoff timestamp with time zone, p_expire_after integer, p_from_empty boolean, p_mark boolean, OUT testruns_considered bigint, OUT testruns_marked bigint, OUT changes flakectl.flake_change[]) RETURNS record
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    SET jit TO 'off'
    SET max_parallel_workers_per_gather TO '0'
    AS $$
declare
  v_overflow text;
begin
  with open_flake as materialized (
    select o.id, o.test_id, o.count, o.fail_count, o.recent_passes_count, o.start_date
      from public.test_analytics_flake o
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
          from public.ta_timeseries_testrun r
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
    update public.ta_timeseries_testrun r
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
          from public.ta_timeseries_testrun r
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

CREATE FUNCTION flakectl.window_start(p_value interval) RETURNS timestamp with time zone
    LANGUAGE plpgsql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_now timestamp := now() at time zone 'UTC';
  v_start timestamp;
  v_seconds numeric;
begin
  begin
    v_start := v_now - p_value;
  exception when datetime_field_overflow then
    v_seconds := extract(epoch from v_now) - extract(epoch from p_value);
    if v_seconds < extract(epoch from timestamp '4714-11-24 00:00:00 BC') then
      return '-infinity'::timestamptz;
    elsif v_seconds <= extract(epoch from v_now) then
      return to_timestamp(v_seconds::double precision);
    end if;
    return null;  -- past the latest representable timestamp
  end;
  if v_start > v_now then
    return null;
  end if;
  return v_start at time zone 'UTC';
end;
$$;

CREATE TABLE flakectl.codecov_schema (
    one_row boolean DEFAULT true NOT NULL,
    name text NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT codecov_schema_one_row_check CHECK (one_row)
);

CREATE TABLE flakectl.created_table (
    name text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    relid regclass NOT NULL
);

CREATE TABLE flakectl.flake_archive (
    id bigint NOT NULL,
    repoid integer NOT NULL,
    test_id bytea NOT NULL,
    flags_id bytea,
    recent_passes_count integer NOT NULL,
    count integer NOT NULL,
    fail_count integer NOT NULL,
    start_date timestamp with time zone NOT NULL,
    end_date timestamp with time zone,
    archived_at timestamp with time zone NOT NULL
);

CREATE TABLE flakectl.processed_upload (
    upload_id bigint NOT NULL,
    repo_id bigint NOT NULL,
    commit_sha text,
    processed_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.commits (
    id bigint NOT NULL,
    commitid text NOT NULL,
    repoid integer NOT NULL,
    branch text,
    merged boolean,
    "timestamp" timestamp with time zone
);

ALTER TABLE public.commits ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.commits_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.reports_commitreport (
    id bigint NOT NULL,
    commit_id bigint NOT NULL,
    code text,
    report_type text
);

ALTER TABLE public.reports_commitreport ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.reports_commitreport_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.reports_upload (
    id bigint NOT NULL,
    report_id bigint NOT NULL,
    state text,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE public.reports_upload ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.reports_upload_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.ta_timeseries_testrun (
    "timestamp" timestamp with time zone NOT NULL,
    test_id bytea NOT NULL,
    name text,
    classname text,
    testsuite text,
    computed_name text,
    outcome text NOT NULL,
    duration_seconds double precision,
    failure_message text,
    framework text,
    filename text,
    repo_id bigint NOT NULL,
    commit_sha text,
    branch text,
    flags text[],
    upload_id bigint,
    properties jsonb
);

CREATE TABLE public.test_analytics_flake (
    id bigint NOT NULL,
    repoid integer NOT NULL,
    test_id bytea NOT NULL,
    flags_id bytea,
    recent_passes_count integer NOT NULL,
    count integer NOT NULL,
    fail_count integer NOT NULL,
    start_date timestamp with time zone NOT NULL,
    end_date timestamp with time zone
);

ALTER TABLE public.test_analytics_flake ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.test_analytics_flake_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE ONLY flakectl.codecov_schema
    ADD CONSTRAINT codecov_schema_pkey PRIMARY KEY (one_row);

ALTER TABLE ONLY flakectl.created_table
    ADD CONSTRAINT created_table_pkey PRIMARY KEY (name);

ALTER TABLE ONLY flakectl.processed_upload
    ADD CONSTRAINT processed_upload_pkey PRIMARY KEY (upload_id);

ALTER TABLE ONLY public.commits
    ADD CONSTRAINT commits_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.reports_commitreport
    ADD CONSTRAINT reports_commitreport_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.reports_upload
    ADD CONSTRAINT reports_upload_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.test_analytics_flake
    ADD CONSTRAINT test_analytics_flake_pkey PRIMARY KEY (id);

CREATE INDEX flake_archive_repoid_archived_at ON flakectl.flake_archive USING btree (repoid, archived_at);

CREATE INDEX processed_upload_processed_at ON flakectl.processed_upload USING btree (processed_at);

CREATE INDEX commits_repoid_commitid ON public.commits USING btree (repoid, commitid);

CREATE UNIQUE INDEX flakectl_flake_one_open ON public.test_analytics_flake USING btree (repoid, test_id) WHERE (end_date IS NULL);

CREATE INDEX reports_commitreport_commit_id_id ON public.reports_commitreport USING btree (commit_id, id);

CREATE INDEX reports_upload_report_id_id ON public.reports_upload USING btree (report_id, id);

CREATE INDEX ta_ts_testrun_repo_commit_time ON public.ta_timeseries_testrun USING btree (repo_id, commit_sha, "timestamp");

CREATE INDEX ta_ts_testrun_repo_test_time ON public.ta_timeseries_testrun USING btree (repo_id, test_id, "timestamp");

CREATE INDEX ta_ts_testrun_upload_outcome_test ON public.ta_timeseries_testrun USING btree (upload_id, outcome, test_id);

CREATE INDEX test_analytics_flake_repoid_end_date ON public.test_analytics_flake USING btree (repoid, end_date);

CREATE INDEX test_analytics_flake_repoid_test_id ON public.test_analytics_flake USING btree (repoid, test_id);

ALTER TABLE ONLY public.reports_commitreport
    ADD CONSTRAINT reports_commitreport_commit_id_fkey FOREIGN KEY (commit_id) REFERENCES public.commits(id);

ALTER TABLE ONLY public.reports_upload
    ADD CONSTRAINT reports_upload_report_id_fkey FOREIGN KEY (report_id) REFERENCES public.reports_commitreport(id);
