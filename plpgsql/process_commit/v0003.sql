-- flakectl.process_commit v0003: process every new upload of one commit.
--
-- The worker's entry point: one SELECT after a commit's test results are in.
-- The uploads are those of SPEC rule 1; the ledger (flakectl.processed_upload)
-- drops the ones processed before, inside process_upload_set, after the lock.
--
-- v0003 (issue 10): SECURITY DEFINER with search_path = pg_catalog, pg_temp
-- and every table qualified with the recorded Codecov schema, so a worker
-- needs EXECUTE on this function only (flakectl db grant ROLE) and nothing
-- on its search_path takes part in a call (docs/security.md); with
-- wait => false it waits for no lock at all (a lock_timeout for the call).
create or replace function flakectl.process_commit(
  repo_id bigint,
  commit_sha text,
  lookback interval default interval '1 day',
  expire_after integer default 30,
  dry_run boolean default false,
  wait boolean default true
) returns flakectl.summary
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_custom_plan
set jit = off
as $$
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
      from @codecov@.commits c
      join @codecov@.reports_commitreport r on r.commit_id = c.id
      join @codecov@.reports_upload u on u.report_id = r.id
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
