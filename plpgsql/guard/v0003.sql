-- flakectl.guard v0003: the prologue every entry point runs before reading state.
--
-- Checks the common arguments (SPEC rule 10), refuses snapshot isolation
-- levels (rule 8: a REPEATABLE READ snapshot is taken before the lock, so it
-- could miss the previous holder's writes; v0001 also refused READ
-- UNCOMMITTED, which PostgreSQL runs as READ COMMITTED), then takes the repository's
-- transaction advisory lock. The two-key form keeps flakectl's locks apart
-- from other users of advisory locks: key 1 is flakectl's namespace, key 2 the
-- repository id (hashed only for ids outside the int4 range).
create or replace function flakectl.guard(
  p_repo_id bigint,
  p_lookback interval,
  p_expire_after integer,
  p_dry_run boolean,
  p_wait boolean
) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_isolation text := current_setting('transaction_isolation');
  v_key integer;
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
  if p_lookback < interval '0' then
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

  v_key := case
    when p_repo_id between -2147483648 and 2147483647 then p_repo_id::integer
    else hashint8(p_repo_id)
  end;
  if p_wait then
    perform pg_advisory_xact_lock(1718381411, v_key);
  elsif not pg_try_advisory_xact_lock(1718381411, v_key) then
    raise exception using errcode = '55P03',
      message = format('flakectl: repository %s is being processed by another call', p_repo_id),
      hint = 'Retry later, or call with wait => true to queue behind it.';
  end if;
end;
$$;
