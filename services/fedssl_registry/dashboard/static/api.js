// The registry's /v1 API as the dashboard reads it (docs/architecture.md section 2).
// Reads only: the POSTs are :predict and :generate, themselves reads under the registry's auth rules.

const TOKEN_KEY = "fedssl.registry.token";

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, message, path) {
    super(message);
    this.status = status;
    this.path = path;
  }
}

async function request(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = getToken();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  let resp;
  try {
    resp = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
  } catch (err) {
    throw new ApiError(0, `the registry did not answer (${err.message})`, path);
  }
  if (!resp.ok) {
    let message = resp.statusText || "request failed";
    try {
      const body = await resp.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch { /* not JSON: keep the status text */ }
    throw new ApiError(resp.status, message, path);
  }
  return resp;
}

const enc = encodeURIComponent;

export const api = {
  runs: async () => (await (await request("/v1/runs")).json()).runs,
  run: async (id) => (await request(`/v1/runs/${enc(id)}`)).json(),
  rounds: async (id) => (await (await request(`/v1/runs/${enc(id)}/rounds`)).json()).rounds,
  roundsCsv: async (id) => (await request(`/v1/runs/${enc(id)}/rounds.csv`)).blob(),
  models: async () => (await (await request("/v1/models")).json()).models,
  model: async (name) => (await request(`/v1/models/${enc(name)}`)).json(),
  versions: async (name) => (await (await request(`/v1/models/${enc(name)}/versions`)).json()).versions,
  /** `hospital`: the asking hospital, served its own label mix (`:predict?hospital=`). */
  predict: async (name, version, file, hospital) => {
    const form = new FormData();
    form.append("file", file, file.name || "image");
    const params = new URLSearchParams();
    if (version) params.set("version", version);
    if (hospital) params.set("hospital", hospital);
    const query = params.size ? `?${params}` : "";
    return (await request(`/v1/models/${enc(name)}:predict${query}`, { method: "POST", body: form })).json();
  },
  /** `count` images of class `cls` (a name or an index) from a generation model's version. */
  generate: async (name, version, cls, count, seed) => {
    const query = version ? `?version=${enc(version)}` : "";
    const body = JSON.stringify({ class: cls, count, seed });
    return (await request(`/v1/models/${enc(name)}:generate${query}`, { method: "POST", headers: { "Content-Type": "application/json" }, body })).json();
  },
};
