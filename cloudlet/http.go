package cloudlet

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"reflect"
	"strings"
	"time"
)

// maxBody bounds a request body.
const maxBody = 64 << 10

// Handler serves the API under /v1, the metrics at /metrics and the status
// page at /.
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	api := func(pattern string, h http.HandlerFunc) { mux.Handle(pattern, s.auth(h)) }
	api("POST /v1/vms", s.postVM)
	api("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"vms": s.List()})
	})
	api("GET /v1/vms/{id}", func(w http.ResponseWriter, r *http.Request) {
		e := s.lookup(r.PathValue("id"))
		if e == nil {
			writeError(w, notFound(r.PathValue("id")))
			return
		}
		v, _ := e.snapshot()
		writeJSON(w, http.StatusOK, v)
	})
	api("GET /v1/vms/{id}/events", s.events)
	api("DELETE /v1/vms/{id}", s.deleteVM)
	api("POST /v1/vms/{id}/handoff", s.postHandoff)
	api("POST /v1/handoffs", s.prepareHandoff)
	api("PUT /v1/handoffs/{hid}/segments/{sha}", s.putSegment)
	api("DELETE /v1/handoffs/{hid}", s.deleteHandoff)
	// The handoff's ID is the capability: the destination fetches the
	// layer as it fetches any overlay, with no token of this cloudlet's.
	mux.Handle("GET /v1/handoffs/layer.overlay", http.HandlerFunc(s.serveLayer))
	api("GET /v1/bases", func(w http.ResponseWriter, r *http.Request) {
		bs, err := s.Bases()
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"bases": bs})
	})
	api("/v1/", func(w http.ResponseWriter, r *http.Request) {
		if allow := allowed(r.URL.Path); allow != "" {
			w.Header().Set("Allow", allow)
			writeError(w, &RequestError{Status: 405, Msg: fmt.Sprintf("%s %s: this path takes %s", r.Method, r.URL.Path, allow)})
			return
		}
		writeError(w, &RequestError{Status: 404, Msg: fmt.Sprintf("no such API call: %s %s (see `cloudletfs cloudlet --help`)", r.Method, r.URL.Path)})
	})
	status := func(h http.Handler) http.Handler {
		if s.opt.OpenStatus {
			return h
		}
		return s.auth(h.ServeHTTP)
	}
	mux.Handle("GET /metrics", status(s.metrics.handler()))
	mux.Handle("GET /{$}", status(http.HandlerFunc(s.statusPage)))
	mux.Handle("/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &RequestError{Status: 404, Msg: "not found: the API is under /v1, metrics at /metrics, the status page at /"})
	}))
	if s.opt.Token != "" {
		return mux
	}
	return hostCheck(mux)
}

// hostCheck serves, for a cloudlet without a token, only requests that
// name it by an IP address or as localhost: a web page the cloudlet's own
// browser loads from another name (DNS rebinding) cannot reach the API.
func hostCheck(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := r.Host
		if hh, _, err := net.SplitHostPort(host); err == nil {
			host = hh
		}
		host = strings.Trim(host, "[]")
		if net.ParseIP(host) == nil && host != "localhost" {
			writeError(w, &RequestError{Status: 403, Msg: fmt.Sprintf("host %q refused: a cloudlet without --token-file answers only requests to an IP address or localhost", r.Host)})
			return
		}
		h.ServeHTTP(w, r)
	})
}

// allowed returns the methods an API path takes, "" for a path that is
// not one.
func allowed(path string) string {
	parts := strings.Split(strings.Trim(path, "/"), "/")
	switch {
	case path == "/v1/vms":
		return "GET, POST"
	case path == "/v1/bases":
		return "GET"
	case len(parts) == 3 && parts[1] == "vms":
		return "GET, DELETE"
	case len(parts) == 4 && parts[1] == "vms" && parts[3] == "events":
		return "GET"
	case len(parts) == 4 && parts[1] == "vms" && parts[3] == "handoff":
		return "POST"
	case path == "/v1/handoffs":
		return "POST"
	case len(parts) == 3 && parts[1] == "handoffs" && parts[2] != "layer.overlay":
		return "DELETE"
	case len(parts) == 5 && parts[1] == "handoffs" && parts[3] == "segments":
		return "PUT"
	case path == "/v1/handoffs/layer.overlay":
		return "GET"
	}
	return ""
}

// jsonKind names what JSON value a Go type is decoded from.
func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Slice, reflect.Array:
		return "a JSON array"
	case reflect.Struct, reflect.Map:
		return "a JSON object"
	case reflect.Int, reflect.Int64, reflect.Int32, reflect.Uint, reflect.Uint64:
		return "a whole number"
	case reflect.Float64:
		return "a JSON number"
	case reflect.String:
		return "a JSON string"
	case reflect.Bool:
		return "a JSON boolean"
	case reflect.Pointer:
		return jsonKind(t.Elem())
	}
	return "another JSON value"
}

func notFound(id string) error {
	return &RequestError{Status: 404, Msg: fmt.Sprintf("no VM %s on this cloudlet (GET /v1/vms lists them)", id)}
}

// auth lets a request through only with the token, if the service has
// one; the comparison takes the same time wherever the tokens differ.
func (s *Service) auth(h http.HandlerFunc) http.Handler {
	if s.opt.Token == "" {
		return h
	}
	want := []byte(s.opt.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, got, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		// The scheme's name is case-insensitive (RFC 9110).
		if subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), want) != 1 || !strings.EqualFold(scheme, "Bearer") {
			s.log.Warn().Str("remote", r.RemoteAddr).Str("path", r.URL.Path).Msg("refused a request without the right token")
			w.Header().Set("WWW-Authenticate", `Bearer realm="cloudletfs"`)
			writeError(w, &RequestError{Status: 401, Msg: "missing or wrong token: send Authorization: Bearer TOKEN, with the token of the cloudlet's --token-file"})
			return
		}
		h(w, r)
	})
}

func (s *Service) postVM(w http.ResponseWriter, r *http.Request) {
	var req Request
	if !decodeJSON(w, r, &req, "overlay, headers, ports, probe, handoff and from") {
		return
	}
	v, err := s.Create(r.Context(), req)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/vms/"+v.ID)
	writeJSON(w, http.StatusAccepted, v)
}

// decodeJSON reads a request's JSON body into v, whose fields are the
// ones named by takes, or answers the request with what is wrong and
// returns false. A form a web page posts cannot send JSON, so no such
// page can make these calls.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any, takes string) bool {
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		writeError(w, &RequestError{Status: 415, Msg: "send the request as Content-Type: application/json"})
		return false
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		var ute *json.UnmarshalTypeError
		switch {
		case errors.As(err, &mbe):
			writeError(w, &RequestError{Status: 413, Msg: fmt.Sprintf("the request body is larger than %d bytes", maxBody)})
		case errors.As(err, &ute):
			writeError(w, badRequest(ute.Field, "want %s", jsonKind(ute.Type)))
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			writeError(w, badRequest(strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`), "unknown field: the request takes %s", takes))
		default:
			writeError(w, badRequest("", "the body is not a JSON request: %v", err))
		}
		return false
	}
	if dec.More() {
		writeError(w, badRequest("", "the body holds more than one JSON value"))
		return false
	}
	return true
}

func (s *Service) deleteVM(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	e := s.lookup(id)
	if e == nil {
		writeError(w, notFound(id))
		return
	}
	if r.URL.Query().Get("forget") != "" {
		if err := s.Remove(id); err != nil {
			writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	v, err := s.Stop(r.Context(), id)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// events streams a VM as server-sent events: the VM now, then again on
// every change, until it has ended. A comment line every 15 s keeps
// proxies from cutting a quiet stream.
func (s *Service) events(w http.ResponseWriter, r *http.Request) {
	e := s.lookup(r.PathValue("id"))
	if e == nil {
		writeError(w, notFound(r.PathValue("id")))
		return
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		writeError(w, errors.New("streaming is not supported on this connection"))
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	keep := time.NewTicker(15 * time.Second)
	defer keep.Stop()
	for {
		v, changed := e.snapshot()
		b, err := json.Marshal(v)
		if err != nil {
			return
		}
		if _, err := fmt.Fprintf(w, "event: vm\ndata: %s\n\n", b); err != nil {
			return
		}
		fl.Flush()
		if v.State.Final() || !waitChange(w, fl, changed, keep.C, r) {
			return
		}
	}
}

// waitChange waits for the VM to change, writing a comment on every tick;
// false if the client went away.
func waitChange(w io.Writer, fl http.Flusher, changed <-chan struct{}, tick <-chan time.Time, r *http.Request) bool {
	for {
		select {
		case <-changed:
			return true
		case <-tick:
			if _, err := io.WriteString(w, ": keep-alive\n\n"); err != nil {
				return false
			}
			fl.Flush()
		case <-r.Context().Done():
			return false
		}
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	var re *RequestError
	if errors.As(err, &re) {
		writeJSON(w, re.Status, Error{Error: re.Msg, Field: re.Field})
		return
	}
	writeJSON(w, http.StatusInternalServerError, Error{Error: err.Error()})
}
