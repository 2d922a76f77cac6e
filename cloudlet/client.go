package cloudlet

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client speaks to a cloudlet service's API.
type Client struct {
	base  *url.URL
	token string
	http  *http.Client
}

// NewClient returns a client of the cloudlet at base (http://HOST:PORT).
func NewClient(base, token string) (*Client, error) {
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--cloudlet %q: want the cloudlet's URL, such as http://cloudlet:8021", base)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	return &Client{base: u, token: token, http: &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		ResponseHeaderTimeout: 90 * time.Second, // a stop waits for the VM
	}}}, nil
}

// APIError is a reply of the cloudlet's that is not a success.
type APIError struct {
	Status int
	Field  string // the request field at fault, for a 400
	Msg    string
}

func (e *APIError) Error() string {
	msg := e.Msg
	if e.Field != "" {
		msg = e.Field + ": " + msg
	}
	return fmt.Sprintf("%s (HTTP %d)", msg, e.Status)
}

// callTimeout bounds a call, so that a server that takes the connection
// and never answers does not hold the caller: an admission reads the
// overlay's header (30 s at most), a stop waits for the VM (60 s).
func callTimeout(method string) time.Duration {
	switch method {
	case http.MethodGet:
		return 30 * time.Second
	case http.MethodPost:
		return time.Minute
	}
	return 90 * time.Second
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	return c.send(ctx, callTimeout(method), method, path, "application/json", rd, out)
}

// send makes one call with body of type ctype, if body is set, and
// decodes a JSON reply into out, if out is set.
func (c *Client) send(ctx context.Context, timeout time.Duration, method, path, ctype string, body io.Reader, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, c.base.String()+path, body)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", ctype)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return c.readError(resp)
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("%s does not answer as a cloudletfs cloudlet does (%s %s: %v)", c.base.Redacted(), method, path, err)
	}
	return nil
}

// unreachable says that the cloudlet could not be asked, without the
// request's URL that the HTTP client's error repeats.
func (c *Client) unreachable(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return fmt.Errorf("cannot reach the cloudlet at %s: %w (is 'cloudletfs cloudlet' running there?)", c.base.Redacted(), err)
}

func (c *Client) readError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var body Error
	if json.Unmarshal(b, &body) != nil || body.Error == "" {
		// Not the cloudlet's JSON: what answered is something else.
		body.Error = fmt.Sprintf("%s is not a cloudletfs cloudlet, or not its API: it answered %s", c.base.Redacted(), resp.Status)
	}
	return &APIError{Status: resp.StatusCode, Field: body.Field, Msg: body.Error}
}

// Create asks for a VM.
func (c *Client) Create(ctx context.Context, r Request) (VM, error) {
	var v VM
	err := c.do(ctx, http.MethodPost, "/v1/vms", r, &v)
	return v, err
}

// Get returns one VM.
func (c *Client) Get(ctx context.Context, id string) (VM, error) {
	var v VM
	err := c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(id), nil, &v)
	return v, err
}

// List returns every VM the cloudlet knows.
func (c *Client) List(ctx context.Context) ([]VM, error) {
	var out struct {
		VMs []VM `json:"vms"`
	}
	err := c.do(ctx, http.MethodGet, "/v1/vms", nil, &out)
	return out.VMs, err
}

// Stop stops a VM and returns it stopped.
func (c *Client) Stop(ctx context.Context, id string) (VM, error) {
	var v VM
	err := c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(id), nil, &v)
	return v, err
}

// Forget has the cloudlet forget a VM that has ended.
func (c *Client) Forget(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(id)+"?forget=1", nil, nil)
}

// Bases lists the bases the cloudlet holds.
func (c *Client) Bases(ctx context.Context) ([]Base, error) {
	var out struct {
		Bases []Base `json:"bases"`
	}
	err := c.do(ctx, http.MethodGet, "/v1/bases", nil, &out)
	return out.Bases, err
}

// Follow calls f with the VM as it is and again on every change, from its
// event stream, until f returns false, the VM has ended, or ctx ends. A
// stream that is cut (the daemon restarting, say) is opened again; it
// gives up only once the cloudlet has refused it for a minute. It returns
// the VM as last seen.
func (c *Client) Follow(ctx context.Context, id string, f func(VM) bool) (VM, error) {
	var last VM
	var failingSince time.Time
	delay := 100 * time.Millisecond
	for {
		done, err := c.stream(ctx, id, func(v VM) bool {
			last = v
			failingSince = time.Time{}
			return f(v) && !v.State.Final()
		})
		if done || ctx.Err() != nil {
			if err == nil {
				err = ctx.Err()
			}
			return last, err
		}
		var ae *APIError
		if errors.As(err, &ae) && ae.Status < 500 {
			return last, err // a 404 or a refused token will not pass
		}
		if failingSince.IsZero() {
			failingSince = time.Now()
		} else if time.Since(failingSince) > time.Minute {
			return last, fmt.Errorf("lost the cloudlet's event stream of VM %s: %w", id, err)
		}
		select {
		case <-ctx.Done():
			return last, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}

// streamIdle is how long an event stream may stay silent before it is
// taken for cut: the cloudlet writes at least every 15 s.
const streamIdle = 45 * time.Second

// stream reads one event stream; done says f or the VM's end stopped it.
func (c *Client) stream(ctx context.Context, id string, f func(VM) bool) (done bool, err error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	idle := time.AfterFunc(streamIdle, func() { cancel(fmt.Errorf("the event stream was silent for %s", streamIdle)) })
	defer idle.Stop()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base.String()+"/v1/vms/"+url.PathEscape(id)+"/events", nil)
	if err != nil {
		return true, err
	}
	req.Header.Set("Accept", "text/event-stream")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return false, c.unreachable(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, c.readError(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	var data []byte
	for sc.Scan() {
		idle.Reset(streamIdle)
		line := sc.Bytes()
		switch {
		case len(line) == 0:
			if len(data) == 0 {
				continue
			}
			var v VM
			if err := json.Unmarshal(data, &v); err != nil {
				return true, fmt.Errorf("cloudlet: an event of VM %s: %w", id, err)
			}
			data = data[:0]
			if !f(v) {
				return true, nil
			}
		case bytes.HasPrefix(line, []byte("data:")):
			data = append(data, bytes.TrimSpace(line[5:])...)
		}
	}
	if err := context.Cause(ctx); err != nil {
		return false, err
	}
	if err := sc.Err(); err != nil {
		return false, err
	}
	return false, io.ErrUnexpectedEOF
}

// Handoff asks the cloudlet to move a running VM to another; it returns
// at once, with the VM as it is. Follow it to see the handoff through.
func (c *Client) Handoff(ctx context.Context, id string, r HandoffRequest) (VM, error) {
	var v VM
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(id)+"/handoff", r, &v)
	return v, err
}

// HandoffPrepare is the body of POST /v1/handoffs: a cloudlet about to
// hand a VM off here says so, and which base the VM needs.
type HandoffPrepare struct {
	ID   string `json:"id"`
	Base string `json:"base"`
	From string `json:"from,omitempty"`
}

// PrepareHandoff readies the destination of a handoff for its segments.
func (c *Client) PrepareHandoff(ctx context.Context, p HandoffPrepare) error {
	return c.do(ctx, http.MethodPost, "/v1/handoffs", p, nil)
}

// PutSegment sends one segment of a handoff ahead to its destination.
func (c *Client) PutSegment(ctx context.Context, handoff, sha string, stored []byte) error {
	return c.send(ctx, 2*time.Minute, http.MethodPut, "/v1/handoffs/"+url.PathEscape(handoff)+"/segments/"+url.PathEscape(sha),
		"application/octet-stream", bytes.NewReader(stored), nil)
}

// DeleteHandoff drops what the destination holds of a handoff that will
// not complete: its staged segments, and a VM made from it that has not
// ended.
func (c *Client) DeleteHandoff(ctx context.Context, handoff string) error {
	return c.do(ctx, http.MethodDelete, "/v1/handoffs/"+url.PathEscape(handoff), nil, nil)
}
