"""Forward-only schema migrations. A migration, once released, is never edited: add a new one.

Each migration runs in its own transaction under an advisory lock, so two relays starting at
once cannot both apply it. A database that is newer than this code is refused rather than
"downgraded": the operator must run the newer relay.
"""

from __future__ import annotations

from typing import Final

MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (
        1,
        "accounts, collabs, append-only events",
        """
        CREATE TABLE accounts (
            account_id    text PRIMARY KEY,
            handle        text NOT NULL UNIQUE,
            password_hash text NOT NULL,
            sign_pk       bytea NOT NULL CHECK (length(sign_pk) = 32),
            box_pk        bytea NOT NULL CHECK (length(box_pk) = 32),
            created_at    timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE collabs (
            collab_id  text PRIMARY KEY,
            created_by text NOT NULL REFERENCES accounts (account_id),
            created_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE collab_members (
            collab_id  text NOT NULL REFERENCES collabs (collab_id),
            account_id text NOT NULL REFERENCES accounts (account_id),
            role       text NOT NULL CHECK (role IN ('owner', 'manager', 'member')),
            PRIMARY KEY (collab_id, account_id)
        );
        CREATE INDEX collab_members_by_account ON collab_members (account_id);

        -- The ledger. (collab_id, seq) is the order the sequencer assigned; event_id is the hash
        -- of the signed event and makes appends idempotent; chain is head_seq of the hash chain.
        CREATE TABLE events (
            collab_id   text NOT NULL REFERENCES collabs (collab_id),
            seq         bigint NOT NULL CHECK (seq >= 1),
            event_id    bytea NOT NULL UNIQUE CHECK (length(event_id) = 32),
            actor_id    text NOT NULL REFERENCES accounts (account_id),
            kind        text NOT NULL,
            ts          bigint NOT NULL,
            body        bytea NOT NULL,
            sig         bytea NOT NULL CHECK (length(sig) = 64),
            chain       bytea NOT NULL CHECK (length(chain) = 32),
            received_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (collab_id, seq)
        );

        CREATE FUNCTION events_are_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the events ledger is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END;
        $$;
        CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
            FOR EACH ROW EXECUTE FUNCTION events_are_append_only();
        CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
            FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();
        """,
    ),
    (
        2,
        "login throttling",
        """
        -- Failed logins per handle (known or not, so the table does not reveal which handles
        -- exist). The relay throttles from these rows; operators list and clear them.
        CREATE TABLE login_failures (
            handle          text PRIMARY KEY,
            failures        integer NOT NULL DEFAULT 0,
            window_start    timestamptz NOT NULL DEFAULT now(),
            window_failures integer NOT NULL DEFAULT 0,
            locked_until    timestamptz,
            last_failure_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        3,
        "sealed keystores",
        """
        -- One sealed keystore per account. Only the account's signing key can replace it
        -- (signature over account, version and blob); versions only go up, so a stolen session
        -- can neither overwrite nor roll it back. A deleted keystore keeps its version row.
        CREATE TABLE keystores (
            account_id text PRIMARY KEY REFERENCES accounts (account_id),
            version    bigint NOT NULL CHECK (version >= 1),
            blob       bytea,
            sig        bytea NOT NULL CHECK (length(sig) = 64),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        4,
        "artifacts",
        """
        -- Encrypted blobs, stored as the client sealed them (model/artifacts.py), one row per
        -- piece so nothing ever needs a whole file in memory. An upload's pieces land first;
        -- the artifact row appears only once the whole upload hashed to its claimed ref.
        CREATE TABLE artifact_pieces (
            upload text NOT NULL,
            idx    integer NOT NULL CHECK (idx >= 0),
            data   bytea NOT NULL,
            PRIMARY KEY (upload, idx)
        );
        CREATE TABLE artifacts (
            collab_id  text NOT NULL REFERENCES collabs (collab_id),
            ref        text NOT NULL,
            upload     text NOT NULL UNIQUE,
            uploader   text NOT NULL REFERENCES accounts (account_id),
            size       bigint NOT NULL,
            pieces     integer NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (collab_id, ref)
        );
        """,
    ),
    (
        5,
        "membership projections",
        """
        -- Membership is decided by the signed `mgmt` events on each collab's ledger (ADR-0010);
        -- collab_members and collabs.epoch are projections of them, written in the same
        -- transaction as the event that changes them and rebuildable from the events
        -- (`cozy relay rebuild-projections`).
        ALTER TABLE collabs ADD COLUMN epoch integer NOT NULL DEFAULT 0 CHECK (epoch >= 0);
        ALTER TABLE collab_members
            ADD COLUMN kind text NOT NULL DEFAULT 'human' CHECK (kind IN ('human', 'agent'));
        CREATE INDEX events_management ON events (collab_id, seq) WHERE kind = 'mgmt';
        """,
    ),
    (
        6,
        "agent capabilities in the membership projection",
        """
        -- An agent's capabilities (read, post, tool:NAME) as its signed `add` proof granted them;
        -- a projection like the rest of collab_members. Humans have none listed.
        ALTER TABLE collab_members ADD COLUMN caps text[] NOT NULL DEFAULT '{}';
        """,
    ),
    (
        7,
        "agent accounts",
        """
        -- Agents are accounts a human creates for a bot: no password (they authenticate with
        -- an agent token), the creator recorded, and a token generation that revocation bumps
        -- so every token issued before is refused at once.
        ALTER TABLE accounts
            ADD COLUMN kind text NOT NULL DEFAULT 'human' CHECK (kind IN ('human', 'agent')),
            ADD COLUMN created_by text REFERENCES accounts (account_id),
            ADD COLUMN token_generation integer NOT NULL DEFAULT 0;
        """,
    ),
    (
        8,
        "uploads with owners and quota; login failures keyed by a keyed hash",
        """
        -- An upload in progress: whose it is, where it goes, how many bytes it holds so far,
        -- and when its last piece came. Its pieces (artifact_pieces) are deleted with it when
        -- it is refused, abandoned or idle too long; when it finishes, this row goes and the
        -- artifacts row takes over. Uploads plus artifacts are what counts against a quota.
        CREATE TABLE uploads (
            upload     text PRIMARY KEY,
            account_id text NOT NULL REFERENCES accounts (account_id),
            collab_id  text NOT NULL REFERENCES collabs (collab_id),
            bytes      bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
            touched_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX uploads_by_account ON uploads (account_id);
        CREATE INDEX uploads_by_touched ON uploads (touched_at);
        CREATE INDEX artifacts_by_uploader ON artifacts (uploader);
        -- Pieces stored before this migration that belong to no finished artifact were left by
        -- refused or abandoned uploads: nothing refers to them.
        DELETE FROM artifact_pieces p
            WHERE NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.upload = p.upload);

        -- Failed logins were keyed by the handle string as typed, which kept every string ever
        -- tried (a password typed into the handle field included). They are now keyed by a
        -- keyed BLAKE2b of the handle whose key lives in the relay's config, not here. The old
        -- rows cannot be converted without that key; they are throttle state of the last hour
        -- at most, so they are dropped (running lockouts end with the upgrade).
        DROP TABLE login_failures;
        CREATE TABLE login_failures (
            handle_key      bytea PRIMARY KEY CHECK (length(handle_key) = 32),
            failures        integer NOT NULL DEFAULT 0,
            window_start    timestamptz NOT NULL DEFAULT now(),
            window_failures integer NOT NULL DEFAULT 0,
            locked_until    timestamptz,
            last_failure_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX login_failures_by_last_failure ON login_failures (last_failure_at);
        """,
    ),
    (
        9,
        "session generations",
        """
        -- A person's session tokens carry the generation they were issued under; ending every
        -- session (or changing the login password) bumps it, so every token issued before is
        -- refused at once, like an agent's `token_generation`.
        ALTER TABLE accounts ADD COLUMN session_generation integer NOT NULL DEFAULT 0;
        -- A person lists the agents they created (`cozy account agents`).
        CREATE INDEX accounts_agents_by_creator ON accounts (created_by) WHERE kind = 'agent';
        """,
    ),
)
