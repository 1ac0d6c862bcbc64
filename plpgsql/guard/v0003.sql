-- flakectl.guard v0003: the prologue every entry point runs before reading state.
--
-- Checks the common arguments (SPEC rule 10) in this order: NULLs (parameter
-- order), then bad values (parameter order: repo_id outside integer 22003,
-- a lookback whose window starts after now() 22023, expire_after < 1 22023),
-- then the isolation level (rule 8: a REPEATABLE READ snapshot is taken
-- before the lock, so it could miss the previous holder's writes; READ
-- UNCOMMITTED runs as READ COMMITTED), then takes the repository's
-- transaction advisory lock. The two-key form keeps flakectl's locks apart
-- from other users of advisory locks: key 1 is flakectl's namespace, key 2
-- the repository id, exactly (v0002 hashed ids outside int4, so two
-- repositories could share a key; such ids are now refused).
--
-- The lookback is judged by the window start it gives now
-- (flakectl.window_start): reaching past the earliest timestamp is no lower
-- bound, not an error; '1 mon -30 days' on 1 March starts in the future and
-- is refused (v0002 compared the interval with zero).
-- Internal: not executable by PUBLIC or a worker; the entry points call it.
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
