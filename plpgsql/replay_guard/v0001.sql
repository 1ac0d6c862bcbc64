-- flakectl.replay_guard v0001: the prologue of replay and replay_rows.
--
-- SPEC rule 10's order: the NULL arguments in replay's parameter order
-- (repo_id and upload_ids here, expire_after and dry_run by flakectl.guard:
-- 22004), then the values (flakectl.guard: repo_id outside integer 22003,
-- expire_after < 1 22023; no lookback: '0' is passed), then the isolation
-- level (0A000), then the repository's lock, always waited for. Returns the
-- uploads as replay takes them: NULLs and duplicates dropped, ascending.
create or replace function flakectl.replay_guard(
  p_repo_id bigint,
  p_upload_ids bigint[],
  p_expire_after integer,
  p_dry_run boolean
) returns bigint[]
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
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
