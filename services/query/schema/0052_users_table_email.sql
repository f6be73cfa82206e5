-- The users table shows each profile's email beside its name (ProfileRow.email): seven people
-- named "Ana Müller" are told apart by it. Recounted with the profile's other facts
-- (rollup_writes.py); the rows there already are filled here from ingest's read contract.
ALTER TABLE query_profiles ADD COLUMN email text;
UPDATE query_profiles q SET email = a.value ->> 'value'
FROM ingest_read_profile_attributes() a
WHERE a.project_id = q.project_id AND a.profile_id = q.profile_id AND a.native
  AND a.name = 'email' AND a.value IS NOT NULL;

-- An erasure strips the email at once with the other facts that name the person (0018).
CREATE OR REPLACE FUNCTION query_erase_profile_rows(p_project uuid, p_profile_ids uuid[],
                                                    p_installation_ids text[],
                                                    p_custom_ids text[])
RETURNS void LANGUAGE sql AS $$
    UPDATE query_profiles
    SET custom_id = NULL, first_name = NULL, last_name = NULL, device_model = NULL, email = NULL
    WHERE project_id = p_project AND profile_id = ANY(p_profile_ids)
$$;
