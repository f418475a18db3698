"""drydock: haul a Django/Wagtail site's database out of production, repair it locally,
and float it back — one Ansible playbook per step, strung together by Invoke."""
