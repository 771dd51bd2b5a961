//! `GET /api/v2/openapi.json`: the OpenAPI 3.1 document of the API, made from the same
//! tables the API runs on (each collection's fields and types come from its view), so it
//! cannot drift from what the master answers.

use axum::Json;
use serde_json::{Map, Value, json};

use kiln_db::views::{self, Kind, View};

/// An operation: method, path, summary, the role it needs, and the collection it lists.
struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    role: &'static str,
    lists: Option<&'static View>,
    body: Option<&'static str>,
}

const fn op(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    role: &'static str,
) -> Op {
    Op {
        method,
        path,
        summary,
        role,
        lists: None,
        body: None,
    }
}

const fn listing(path: &'static str, summary: &'static str, view: &'static View) -> Op {
    Op {
        method: "get",
        path,
        summary,
        role: "read",
        lists: Some(view),
        body: None,
    }
}

const fn with_body(mut o: Op, body: &'static str) -> Op {
    o.body = Some(body);
    o
}

static OPS: &[Op] = &[
    op(
        "get",
        "/api/v2/auth",
        "Who the caller is: token name and role",
        "read",
    ),
    op(
        "post",
        "/api/v2/auth/ticket",
        "A one-minute ticket (?ticket=) that opens the event stream and raw logs as the caller",
        "read",
    ),
    listing(
        "/api/v2/masters",
        "Masters sharing the database",
        &views::MASTERS,
    ),
    listing(
        "/api/v2/builders",
        "Builders, with pending and running counts and the last build",
        &views::BUILDERS,
    ),
    op(
        "get",
        "/api/v2/builders/{builder}",
        "One builder, by id or name",
        "read",
    ),
    listing(
        "/api/v2/builders/{builder}/builds",
        "A builder's builds",
        &views::BUILDS,
    ),
    listing("/api/v2/builds", "Builds", &views::BUILDS),
    op(
        "get",
        "/api/v2/builds/{id}",
        "A build with its steps, logs, properties, buildset and changes",
        "read",
    ),
    with_body(
        op(
            "post",
            "/api/v2/builds/{id}/stop",
            "Stop a running build",
            "force",
        ),
        "{\"reason\": \"...\"} (optional)",
    ),
    with_body(
        op(
            "post",
            "/api/v2/builds/{id}/steps/{number}/stop",
            "Stop one step of a running build",
            "force",
        ),
        "{\"reason\": \"...\"} (optional)",
    ),
    op(
        "post",
        "/api/v2/builds/{id}/rebuild",
        "Build again: same source stamps and properties, same builder",
        "force",
    ),
    op("get", "/api/v2/logs/{id}", "A log's metadata", "read"),
    op(
        "get",
        "/api/v2/logs/{id}/contents",
        "Lines of a log: ?offset=N&limit=M, as [channel, text] pairs (o stdout, e stderr, h header)",
        "read",
    ),
    op(
        "get",
        "/api/v2/logs/{id}/raw",
        "A log as a text file",
        "read",
    ),
    listing(
        "/api/v2/buildrequests",
        "Build requests, with estimated start and finish of pending ones",
        &views::BUILDREQUESTS,
    ),
    op(
        "get",
        "/api/v2/buildrequests/{id}",
        "One build request",
        "read",
    ),
    op(
        "post",
        "/api/v2/buildrequests/{id}/cancel",
        "Cancel a pending build request",
        "force",
    ),
    with_body(
        op(
            "post",
            "/api/v2/buildrequests/{id}/priority",
            "Set a pending request's priority (higher first)",
            "force",
        ),
        "{\"priority\": 10}",
    ),
    listing("/api/v2/buildsets", "Buildsets", &views::BUILDSETS),
    op(
        "get",
        "/api/v2/buildsets/{id}",
        "A buildset with its source stamps, properties and requests",
        "read",
    ),
    listing(
        "/api/v2/changes",
        "Changes, with their files",
        &views::CHANGES,
    ),
    with_body(
        op(
            "post",
            "/api/v2/changes",
            "Record a change for the schedulers",
            "force",
        ),
        "{\"author\": \"...\", \"branch\": \"...\", \"revision\": \"...\", \"files\": [...], \"comments\": \"...\", \"repository\": \"...\", \"project\": \"...\"}",
    ),
    op("get", "/api/v2/changes/{id}", "One change", "read"),
    listing(
        "/api/v2/sourcestamps",
        "Source stamps",
        &views::SOURCESTAMPS,
    ),
    op(
        "get",
        "/api/v2/sourcestamps/{id}",
        "One source stamp",
        "read",
    ),
    op(
        "get",
        "/api/v2/schedulers",
        "Schedulers of the configuration in force",
        "read",
    ),
    op(
        "get",
        "/api/v2/forceschedulers",
        "Force schedulers with their typed parameters",
        "read",
    ),
    op(
        "get",
        "/api/v2/forceschedulers/{name}",
        "One force scheduler",
        "read",
    ),
    with_body(
        op(
            "post",
            "/api/v2/forceschedulers/{name}",
            "Force a build",
            "force",
        ),
        "{\"builders\": [...], \"reason\": \"...\", \"owner\": \"...\", \"branch\": \"...\", \"revision\": \"...\", \"parameters\": {...}, \"priority\": 0}",
    ),
    with_body(
        op(
            "post",
            "/api/v2/tryschedulers/{name}",
            "Build a patch on its base revision (kiln try); the scheduler's users list names the tokens it takes",
            "force",
        ),
        "{\"baserev\": \"40 hex digits\", \"patch\": \"diff text\", \"patch_level\": 1, \"builders\": [...], \"branch\": \"...\", \"repository\": \"...\", \"comment\": \"...\", \"properties\": {...}}",
    ),
    op(
        "get",
        "/api/v2/workers",
        "Configured workers: connection, builds, health, pause, latent state",
        "read",
    ),
    op("get", "/api/v2/workers/{name}", "One worker", "read"),
    op(
        "post",
        "/api/v2/workers/{name}/pause",
        "Pause a worker (no new builds)",
        "admin",
    ),
    op(
        "post",
        "/api/v2/workers/{name}/unpause",
        "Unpause a worker",
        "admin",
    ),
    op(
        "post",
        "/api/v2/workers/{name}/stop",
        "Ask a connected worker to finish its builds and exit",
        "admin",
    ),
    listing(
        "/api/v2/stepmodules",
        "Uploaded step, observer and policy modules, with where the configuration uses them",
        &views::STEPMODULES,
    ),
    with_body(
        op(
            "post",
            "/api/v2/stepmodules",
            "Upload a module: ?name=NAME&version=V, the .wasm file as the body (application/wasm)",
            "upload",
        ),
        "the .wasm component",
    ),
    op(
        "get",
        "/api/v2/stepmodules/{name}",
        "The versions of a module, newest first",
        "read",
    ),
    op(
        "get",
        "/api/v2/stepmodules/{name}/{version}",
        "One module version",
        "read",
    ),
    op(
        "delete",
        "/api/v2/stepmodules/{name}/{version}",
        "Delete a module version the configuration does not use",
        "admin",
    ),
    op(
        "get",
        "/api/v2/changesources",
        "Change sources in force; git pollers with their last poll, last error, failures in a row and recorded heads",
        "read",
    ),
    op(
        "get",
        "/api/v2/changesources/{name}",
        "One change source",
        "read",
    ),
    op(
        "get",
        "/api/v2/reporters",
        "Reporters in force with their deliveries counted by state, their latest failures and the deliveries being retried",
        "read",
    ),
    op(
        "get",
        "/api/v2/reporters/{name}/deliveries",
        "One reporter's deliveries, newest first (state, limit)",
        "read",
    ),
    op(
        "post",
        "/api/v2/changesources/{name}/poll",
        "Ask a git poller to poll now",
        "force",
    ),
    op(
        "post",
        "/api/v2/control/reconfig",
        "Reload the configuration file",
        "admin",
    ),
    op(
        "get",
        "/api/v2/events",
        "Server-Sent Events: build, step, request, worker; ?logs=ID,ID adds those logs' lines; ?kinds=build,step narrows",
        "read",
    ),
    op(
        "get",
        "/metrics",
        "Prometheus metrics (OpenMetrics text)",
        "read",
    ),
];

fn schema_of(kind: Kind) -> Value {
    match kind {
        Kind::Int => json!({"type": ["integer", "null"]}),
        Kind::Text => json!({"type": ["string", "null"]}),
        Kind::Bool => json!({"type": ["boolean", "null"]}),
        Kind::Json => json!({}),
        Kind::Results => {
            json!({"enum": ["SUCCESS", "WARNINGS", "FAILURE", "SKIPPED", "EXCEPTION", "RETRY", "CANCELLED", null]})
        }
    }
}

fn query_parameters(view: &View) -> Vec<Value> {
    let mut params = vec![
        json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": views::MAX_LIMIT}}),
        json!({"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}),
        json!({"name": "order", "in": "query", "description": "a field, or -field for descending; comma-separated or repeated", "schema": {"type": "string"}}),
    ];
    for (name, kind) in view.columns {
        params.push(json!({
            "name": name, "in": "query", "schema": schema_of(*kind),
            "description": format!("equals (repeat for any of several); also {name}__ne, __lt, __le, __gt, __ge, __contains; the value null matches a missing value"),
        }));
    }
    params
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect()
}

/// The document.
pub fn build() -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert(
        "Error".into(),
        json!({"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}),
    );
    for o in OPS {
        let mut operation = json!({
            "summary": o.summary,
            "description": format!("Needs the {} role.", o.role),
            "parameters": path_parameters(o.path),
            "responses": {
                "default": {"description": "an error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        });
        operation["security"] = json!([{"bearer": []}, {}]);
        if let Some(view) = o.lists {
            let item_name = format!("{}Item", view.name);
            schemas.entry(item_name.clone()).or_insert_with(|| {
                let props: Map<String, Value> = view
                    .columns
                    .iter()
                    .map(|(n, k)| ((*n).to_owned(), schema_of(*k)))
                    .collect();
                json!({"type": "object", "properties": props})
            });
            if let Some(params) = operation["parameters"].as_array_mut() {
                params.extend(query_parameters(view));
            }
            operation["responses"]["200"] = json!({
                "description": format!("a page of {}", view.name),
                "content": {"application/json": {"schema": {
                    "type": "object",
                    "properties": {
                        view.name: {"type": "array", "items": {"$ref": format!("#/components/schemas/{item_name}")}},
                        "meta": {"type": "object", "properties": {"total": {"type": "integer"}}},
                    },
                }}},
            });
        } else {
            operation["responses"]["200"] = json!({"description": "success"});
        }
        if let Some(body) = o.body {
            operation["requestBody"] = json!({"description": body, "content": {
                if o.path == "/api/v2/stepmodules" { "application/wasm" } else { "application/json" }: {}
            }});
        }
        paths
            .entry(o.path.to_owned())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .map(|p| p.insert(o.method.to_owned(), operation));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Kiln master API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Modeled on Buildbot's /api/v2. Reads are anonymous unless [master] anonymous says otherwise; actions need `Authorization: Bearer TOKEN` with a role (read < force < upload < admin).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

/// `GET /api/v2/openapi.json`.
pub async fn document() -> Json<Value> {
    Json(build())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_lists_every_operation_once_with_its_fields() {
        let doc = super::build();
        let paths = doc["paths"].as_object().unwrap();
        let count: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(count, super::OPS.len(), "an operation is listed twice");
        assert!(doc["components"]["schemas"]["buildsItem"]["properties"]["buildid"].is_object());
        assert_eq!(
            paths["/api/v2/stepmodules/{name}/{version}"]["delete"]["parameters"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
