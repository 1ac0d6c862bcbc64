-- flakectl.window_start v0001: the start of a window reaching `p_value` back
-- from now() (SPEC rule 10), for lookback and prune_ledger's older_than.
--
-- The start is computed as PostgreSQL computes timestamp - interval, in UTC
-- whatever the session's TimeZone (month arithmetic depends on the calendar:
-- '1 mon -30 days' on 1 March lands on 3 March). It is judged at call time:
--   * at or before now(): the start;
--   * before the earliest representable timestamp: '-infinity', no lower
--     bound (a lookback of '10000 years' is not an error);
--   * after now(), or past the latest representable timestamp: NULL, a
--     negative window; the caller raises 22023 naming its argument.
-- When PostgreSQL cannot compute the subtraction (a part of the interval
-- leaves the representable range on its own), the start is judged by the
-- interval's length in seconds (months as 30.4375 days, PostgreSQL's
-- extract(epoch)).
-- Internal: called by guard and prune_ledger; not executable by PUBLIC.
create or replace function flakectl.window_start(
  p_value interval
) returns timestamptz
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
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
