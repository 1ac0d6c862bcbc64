-- flakectl.process_uploads v0003: process a caller-given list of uploads.
--
-- For deployments whose reports tables live elsewhere: the list is trusted as
-- is (the reports tables are not read); NULLs and duplicates are dropped, the
-- ledger drops ids processed before, the rest run in ascending id order.
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

  select coalesce(array_agg(distinct u order by u), '{}')
    into v_candidates
    from unnest(process_uploads.upload_ids) as u
   where u is not null;

  return flakectl.process_upload_set(process_uploads.repo_id, v_candidates, process_uploads.lookback,
                                     process_uploads.expire_after, process_uploads.dry_run, null);
end;
$$;
