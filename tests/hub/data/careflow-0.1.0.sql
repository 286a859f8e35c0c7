BEGIN TRANSACTION;
CREATE TABLE cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO "cursors" VALUES('alerts',4);
INSERT INTO "cursors" VALUES('alerts-conflicts',0);
INSERT INTO "cursors" VALUES('alerts-over-bound',0);
CREATE TABLE dead_letters (
    pos INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    topic TEXT NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL,
    payload_size INTEGER NOT NULL,
    batch_index INTEGER,
    log_pos INTEGER  -- a conflict, a refused care alarm: the end of the event log after its commit
);
CREATE TABLE devices (
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    events INTEGER NOT NULL,
    last_time_ms INTEGER NOT NULL,
    last_type TEXT NOT NULL,
    boot TEXT NOT NULL,
    seq INTEGER NOT NULL,
    skew_ms INTEGER NOT NULL, battery_pct, battery_pct_ms, firmware, firmware_ms, interval_s, interval_s_ms, condition, condition_ms, kind, kind_ms, serial, serial_ms, labels, labels_ms, membership, membership_ms,
    PRIMARY KEY (gateway, device)
) WITHOUT ROWID;
INSERT INTO "devices" VALUES('gw-1','door-1',1796036773234,1796036773234,1,1796036773230,'status','b-door1',1,4,12,1796036773230,NULL,NULL,NULL,NULL,'degraded',1796036773230,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL);
INSERT INTO "devices" VALUES('gw-1','gw-1',1796036772394,1796036772394,1,1796036772389,'heartbeat','b-gw1',1,5,NULL,NULL,NULL,NULL,60,1796036772389,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL);
INSERT INTO "devices" VALUES('gw-1','sos-1',1796036774121,1796036774121,1,1796036774113,'alert','b-sos1',1,8,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL);
INSERT INTO "devices" VALUES('gw-2','gw-2',1796036774932,1796036774932,1,1796036774928,'heartbeat','b-gw2',1,4,NULL,NULL,NULL,NULL,60,1796036774928,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL);
CREATE TABLE events (
    pos INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    type TEXT NOT NULL,
    time TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    boot TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (gateway, device, boot, seq)
);
INSERT INTO "events" VALUES(1,'01a22c22-4225-71c4-9352-18220de0539e','gw-1','gw-1','heartbeat','2026-11-30T11:06:12.389Z',1796036772389,1796036772394,'b-gw1',1,'{"v": 1, "id": "01a22c22-4225-71c4-9352-18220de0539e", "type": "heartbeat", "gateway": "gw-1", "device": "gw-1", "time": "2026-11-30T11:06:12.389Z", "boot": "b-gw1", "seq": 1, "data": {"interval_s": 60}}');
INSERT INTO "events" VALUES(2,'01a22c22-456e-7fe2-bd97-927fd90105fa','gw-1','door-1','status','2026-11-30T11:06:13.230Z',1796036773230,1796036773234,'b-door1',1,'{"v": 1, "id": "01a22c22-456e-7fe2-bd97-927fd90105fa", "type": "status", "gateway": "gw-1", "device": "door-1", "time": "2026-11-30T11:06:13.230Z", "boot": "b-door1", "seq": 1, "data": {"state": "degraded", "battery_pct": 12}}');
INSERT INTO "events" VALUES(3,'01a22c22-48e1-7369-ae43-e417f81ceae2','gw-1','sos-1','alert','2026-11-30T11:06:14.113Z',1796036774113,1796036774121,'b-sos1',1,'{"v": 1, "id": "01a22c22-48e1-7369-ae43-e417f81ceae2", "type": "alert", "gateway": "gw-1", "device": "sos-1", "time": "2026-11-30T11:06:14.113Z", "boot": "b-sos1", "seq": 1, "data": {"kind": "sos", "state": "raised"}}');
INSERT INTO "events" VALUES(4,'01a22c22-4c10-784c-9f13-ab54987982cf','gw-2','gw-2','heartbeat','2026-11-30T11:06:14.928Z',1796036774928,1796036774932,'b-gw2',1,'{"v": 1, "id": "01a22c22-4c10-784c-9f13-ab54987982cf", "type": "heartbeat", "gateway": "gw-2", "device": "gw-2", "time": "2026-11-30T11:06:14.928Z", "boot": "b-gw2", "seq": 1, "data": {"interval_s": 60}}');
CREATE TABLE health (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    written_ms INTEGER NOT NULL,
    report TEXT NOT NULL
);
INSERT INTO "health" VALUES(1,1796036778211,'{"connected": true, "broker": "mqtt://127.0.0.1:18987", "embedded_broker": true, "started_ms": 1796036770362, "messages": 4, "events_stored": 4, "events_per_s": 0.5, "duplicates": 0, "conflicts": 0, "dead_lettered": 0, "rejects_by_code": {}, "queue_depth": 0, "queue_bound": 20000, "commit_latency_ms": 8.0, "event_age_ms": 12, "store_errors": 0, "resend_requests": 0, "alert_errors": 0, "alert_lag_ms": 251, "incidents_opened": 1, "alerts_unrecorded": 0, "last_error": null, "influx": null}');
CREATE TABLE incidents (
    id INTEGER PRIMARY KEY,
    rule TEXT NOT NULL,
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,
    summary TEXT NOT NULL,
    detail TEXT NOT NULL,
    triggered_ms INTEGER NOT NULL,
    acknowledged_ms INTEGER,
    acknowledged_by TEXT,
    resolved_ms INTEGER,
    resolved_by TEXT,
    escalation_sent INTEGER NOT NULL DEFAULT 0,
    raises INTEGER NOT NULL DEFAULT 1,
    first_raised_ms INTEGER,
    last_raised_ms INTEGER,
    follows_id INTEGER,
    next_due_ms INTEGER  -- when the escalation walk must look at it next (NULL: never)
);
INSERT INTO "incidents" VALUES(1,'care-alarm','gw-1','sos-1','critical','open','CARE ALARM from sos-1 at gw-1','alert {''kind'': ''sos'', ''state'': ''raised''}',1796036774129,NULL,NULL,NULL,NULL,0,1,1796036774129,1796036774129,NULL,1796037074129);
INSERT INTO "incidents" VALUES(2,'hub-notifications-failing','careflow-hub','hub','critical','open','careflow hub: hub-notifications-failing','1 notification(s) failed for good or keep failing: check the channels (careflow notify list --state failed; careflow notify test CHANNEL); oncall: the channel did not take the message: A Connection error occurred sending JSON notification to 127.0.0.1. | Socket Exception: HTTPConnectionPool(host=''127.0.0.1'', port=9): Max retries exceeded with ur',1796036777960,NULL,NULL,NULL,NULL,0,1,1796036777960,1796036777960,NULL,1796037077960);
CREATE TABLE maintenance (
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,  -- '*' pauses the whole gateway
    until_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (gateway, device)
) WITHOUT ROWID;
INSERT INTO "maintenance" VALUES('gw-2','*',1796043976503,'maintenance');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','1');
CREATE TABLE notifications (
    id INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL,
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER,
    group_key TEXT NOT NULL DEFAULT ''
);
INSERT INTO "notifications" VALUES(1,1,'oncall','firing','[CRITICAL] CARE ALARM from sos-1 at gw-1','What: CARE ALARM from sos-1 at gw-1
Where: gateway gw-1, device sos-1
Since: 2026-11-30 11:06:14 UTC
Detail: alert {''kind'': ''sos'', ''state'': ''raised''}
What to do: Runbook: runbooks/care-alarm.md
Acknowledge: careflow incidents list, then careflow incidents ack <id>','pending',3,1796036781171,'the channel did not take the message: A Connection error occurred sending JSON notification to 127.0.0.1. | Socket Exception: HTTPConnectionPool(host=''127.0.0.1'', port=9): Max retries exceeded with url: / (Caused by NewConnectionError("HTTPConnection(host=''127.0.0.1'', port=9): Failed to establish a new connection: [Errno 111] Connection refused"))',1796036774129,NULL,'gw-1');
INSERT INTO "notifications" VALUES(2,2,'ops','firing','[CRITICAL] careflow hub: hub-notifications-failing','What: careflow hub: hub-notifications-failing
Where: gateway careflow-hub, device hub
Since: 2026-11-30 11:06:17 UTC
Detail: 1 notification(s) failed for good or keep failing: check the channels (careflow notify list --state failed; careflow notify test CHANNEL); oncall: the channel did not take the message: A Connection error occurred sending JSON notification to 127.0.0.1. | Socket Exception: HTTPConnectionPool(host=''127.0.0.1'', port=9): Max retries exceeded with ur
What to do: Runbook: runbooks/hub-unhealthy.md
Acknowledge: careflow incidents list, then careflow incidents ack <id>','pending',1,1796036778966,'the channel did not take the message: A Connection error occurred sending JSON notification to 127.0.0.1. | Socket Exception: HTTPConnectionPool(host=''127.0.0.1'', port=9): Max retries exceeded with url: / (Caused by NewConnectionError("HTTPConnection(host=''127.0.0.1'', port=9): Failed to establish a new connection: [Errno 111] Connection refused"))',1796036777960,NULL,'careflow-hub');
CREATE TABLE outbox (  -- lines for an external sink that are in no other log
    pos INTEGER PRIMARY KEY,
    sink TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE TABLE presence (
    gateway TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    conn INTEGER NOT NULL,
    boot TEXT NOT NULL,
    changed_ms INTEGER NOT NULL,
    reason TEXT
) WITHOUT ROWID;
CREATE TABLE presence_log (  -- every accepted change, for charts and uptime
    pos INTEGER PRIMARY KEY,
    gateway TEXT NOT NULL,
    state TEXT NOT NULL,
    conn INTEGER NOT NULL,
    boot TEXT NOT NULL,
    changed_ms INTEGER NOT NULL,
    reason TEXT
);
CREATE TABLE provision_refusals (
    source TEXT NOT NULL,
    serial TEXT NOT NULL,
    code TEXT NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (source, serial, code)
) WITHOUT ROWID;
CREATE TABLE provision_revocations (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    reason TEXT NOT NULL,
    requested_ms INTEGER NOT NULL,
    done_ms INTEGER
);
CREATE TABLE provision_serials (
    serial TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    gateway_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    token_hash TEXT,
    token_expires_ms INTEGER,
    key_fingerprint TEXT,
    cert_serial TEXT,
    cert_not_after_ms INTEGER,
    cert_pem TEXT,
    registered_ms INTEGER NOT NULL,
    claimed_ms INTEGER,
    issued_ms INTEGER,
    connected_ms INTEGER,
    active_ms INTEGER,
    renewed_ms INTEGER,
    revoked_ms INTEGER,
    last_error TEXT,
    last_error_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE silences (
    id INTEGER PRIMARY KEY,
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    rule TEXT NOT NULL,
    starts_ms INTEGER NOT NULL,
    ends_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    comment TEXT NOT NULL
);
INSERT INTO "silences" VALUES(1,'gw-1','*','battery-low',1796036775737,1796043975737,'root','battery swap');
CREATE TABLE sources (
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    boot TEXT NOT NULL,
    max_seq INTEGER NOT NULL,
    received INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, device, boot)
) WITHOUT ROWID;
INSERT INTO "sources" VALUES('gw-1','door-1','b-door1',1,1,1796036773234);
INSERT INTO "sources" VALUES('gw-1','gw-1','b-gw1',1,1,1796036772394);
INSERT INTO "sources" VALUES('gw-1','sos-1','b-sos1',1,1,1796036774121);
INSERT INTO "sources" VALUES('gw-2','gw-2','b-gw2',1,1,1796036774932);
CREATE INDEX events_by_time ON events (time_ms);
CREATE INDEX dead_letters_by_code ON dead_letters (code, pos);
CREATE INDEX dead_letters_by_topic ON dead_letters (topic);
CREATE INDEX presence_log_by_boot ON presence_log (gateway, boot);
CREATE UNIQUE INDEX incidents_unresolved
    ON incidents (rule, gateway, device) WHERE state != 'resolved';
CREATE INDEX notifications_due ON notifications (state, next_attempt_ms);
CREATE INDEX notifications_group
    ON notifications (channel, group_key, kind, state);
CREATE INDEX incidents_due ON incidents (next_due_ms) WHERE state = 'open';
CREATE INDEX dead_letters_placed ON dead_letters (code, pos) WHERE log_pos IS NOT NULL;
CREATE INDEX provision_refusals_by_time ON provision_refusals (last_ms);
CREATE INDEX provision_refusals_by_serial ON provision_refusals (serial, last_ms);
COMMIT;
