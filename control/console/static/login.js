// The login page needs no script; kept so the asset list is stable.
