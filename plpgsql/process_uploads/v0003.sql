-- flakectl.process_uploads v0003: process a caller-given list of uploads.
--
-- For deployments whose reports tables live elsewhere: the list is trusted as
-- is (the reports tables are not read); NULLs and duplicates are dropped, the
-- ledger drops ids processed before, the rest run in ascending id order.
--
-- v0003 (issue 10): SECURITY DEFINER with search_path = pg_catalog, pg_temp
-- (docs/security.md); with wait => false it waits for no lock at all (a
-- lock_timeout for the call).
create or replace function flakectl.process_uploads(
  repo_id bigint,
  upload_ids bigint[],
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
