-- Leave room on each page so an update that keeps the status (a provider
-- re-publishing an unchanged status with a newer time) is a HOT update: a new
-- row version on the same page and no index writes. Applies to pages written
-- from now on; a VACUUM FULL applies it to an existing table.
ALTER TABLE service_type_instances SET (fillfactor = 70);
