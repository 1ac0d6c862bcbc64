-- flakectl.replay_rows v0001: what a dry-run replay compares, row by row.
--
-- Same arguments, checks and lock as flakectl.replay (no dry_run: it never
-- writes). Returns the rows of L (side 'live', with their id and flags_id)
-- and of R (side 'replayed') of every test that has a row without a pair,
-- each with `paired`; the tests whose rows are all identical are left out.
-- `flakectl replay` prints them side by side before --apply writes anything.
create or replace function flakectl.replay_rows(
  repo_id bigint,
  upload_ids bigint[],
  expire_after integer default 30
) returns setof flakectl.replay_row
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_custom_plan
set jit = off
as $$
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
