// Package cloudlet is the cloudlet service: a long-running daemon that
// users' devices ask, over a JSON API, to synthesize VMs from overlays. It
// runs many VMs side by side, each in a worker process of its own (its
// mount and its QEMU), so that the daemon can stop and start again without
// killing them; a Badger registry in the state dir lets a new daemon find
// them again. It admits VMs against the cloudlet's limits, reports their
// timelines and progress as JSON, as server-sent events, as Prometheus
// metrics and on a server-rendered status page, and stops them. The VM
// journey itself is package launch's; this package reaches the overlay only
// through launch, session and fetch's exported API.
package cloudlet

import (
	"time"

	"github.com/cloudletfs/cloudletfs/fetch"
)

// Request asks for a VM: the body of POST /v1/vms.
type Request struct {
	// Overlay is the overlay's URL: http://, https:// (presigned S3 URLs
	// too), s3://bucket/key, or file:// where the cloudlet allows it.
	Overlay string `json:"overlay"`
	// Headers are sent with every request for the overlay (credentials,
	// say). They are never shown again.
	Headers map[string]string `json:"headers,omitempty"`
	// Ports are the guest's TCP ports to reach from the cloudlet's
	// network; none takes the one the overlay's vm.json names.
	Ports []int `json:"ports,omitempty"`
	// Probe says when the application answers: its first response is
	// the VM's first response.
	Probe *Probe `json:"probe,omitempty"`
	// Handoff, set by the cloudlet a VM is handed off from, names the
	// handoff whose segments sent ahead (POST /v1/handoffs) this VM's
	// overlay, the handoff's layer, reads locally.
	Handoff string `json:"handoff,omitempty"`
	// From is that cloudlet's URL, for the record.
	From string `json:"from,omitempty"`
}

// HandoffRequest asks to move a running VM to another cloudlet: the body
// of POST /v1/vms/{id}/handoff.
type HandoffRequest struct {
	// To is the destination cloudlet's URL, as this cloudlet reaches it.
	To string `json:"to"`
	// Token is the destination's API token, if it has one.
	Token string `json:"token,omitempty"`
}

// Handoff is a VM's move between cloudlets, as each of them reports it.
type Handoff struct {
	ID   string `json:"id"`
	To   string `json:"to,omitempty"`   // on the source: the destination
	From string `json:"from,omitempty"` // on the destination: the source
	// Phase is where the handoff is (see the Handoff phases).
	Phase  string `json:"phase"`
	Reason string `json:"reason,omitempty"` // why it failed
	// DestVM and DestPorts are the VM on the destination, once created.
	DestVM    string `json:"dest_vm,omitempty"`
	DestPorts []Port `json:"dest_ports,omitempty"`
	// Timeline: rounds (with the bytes each sent ahead and the codec),
	// the stop, the layer, the destination running and complete; timed
	// from the handoff's request.
	Timeline []Step `json:"timeline"`
	Rounds   int    `json:"rounds,omitempty"`
	// PushedBytes were sent ahead while the VM ran; LayerBytes is the
	// layer's size, MetadataBytes what of it the destination needs to
	// resume, FinalBytes its segments left for the destination to fetch.
	PushedBytes   int64 `json:"pushed_bytes,omitempty"`
	LayerBytes    int64 `json:"layer_bytes,omitempty"`
	MetadataBytes int64 `json:"metadata_bytes,omitempty"`
	FinalBytes    int64 `json:"final_bytes,omitempty"`
	// DowntimeS is from QEMU stopping the VM here to the destination
	// running it.
	DowntimeS float64 `json:"downtime_s,omitempty"`
}

// Handoff phases.
const (
	HandoffSending  = "sending"  // rounds: the VM runs here while what it changed goes ahead
	HandoffResuming = "resuming" // the VM is stopped here; the destination resumes it from the layer
	HandoffRunning  = "running"  // the destination runs it; it fetches the rest from here
	HandoffComplete = "complete" // the destination has every chunk; this cloudlet let the VM go
	HandoffFailed   = "failed"   // see Reason; the VM runs on here
)

// Probe is how the cloudlet finds out that the guest's application
// answers.
type Probe struct {
	// HTTP is a path GET on the first port until it answers 2xx.
	HTTP string `json:"http,omitempty"`
}

// State is where a VM is in its journey.
type State string

// The states of a VM. A VM moves forward through them; Stopped and Failed
// are final.
const (
	FetchingMetadata State = "fetching-metadata" // admitted; the overlay's metadata is on its way
	Resuming         State = "resuming"          // mounted; QEMU is resuming the VM
	Running          State = "running"           // the VM runs; its application has not answered yet
	FirstResponse    State = "first-response"    // the application answered; the overlay is still arriving
	Complete         State = "complete"          // answered, and every segment of the overlay is present
	Stopping         State = "stopping"          // a stop was asked for
	Stopped          State = "stopped"           // stopped as asked, or exited on its own after answering
	Failed           State = "failed"            // see Reason
	Moved            State = "moved"             // handed off to another cloudlet (see Handoff)
)

// Final reports whether a VM in state s has ended.
func (s State) Final() bool { return s == Stopped || s == Failed || s == Moved }

// States lists every state, in journey order.
var States = []State{FetchingMetadata, Resuming, Running, FirstResponse, Complete, Stopping, Stopped, Failed, Moved}

// VM is what the cloudlet reports of one VM: GET /v1/vms/{id}, and each
// event of /v1/vms/{id}/events.
type VM struct {
	ID      string `json:"id"`
	Overlay string `json:"overlay"` // without credentials
	State   State  `json:"state"`
	// Reason says why a VM failed, or how it stopped.
	Reason    string    `json:"reason,omitempty"`
	Requested time.Time `json:"requested"`
	Base      string    `json:"base,omitempty"` // the base's name
	// MemoryBytes is the guest's RAM, which admission counts.
	MemoryBytes int64 `json:"memory_bytes"`
	// Timeline is every step so far, timed from the request.
	Timeline []Step `json:"timeline"`
	// Ports are where the guest's ports are reached, once it runs.
	Ports []Port `json:"ports,omitempty"`
	// Progress is the overlay's arrival, once mounted.
	Progress *Progress `json:"progress,omitempty"`
	// Stats are the mount's full statistics, once mounted.
	Stats *fetch.Stats `json:"stats,omitempty"`
	// Handoff is the VM's move to another cloudlet, or from one.
	Handoff *Handoff `json:"handoff,omitempty"`
}

// Step is one point of a VM's timeline.
type Step struct {
	At   float64 `json:"at_s"` // seconds since the request
	Step string  `json:"step"`
	Text string  `json:"text"`
}

// Port is a guest port and the host address it is forwarded from.
type Port struct {
	Guest int    `json:"guest"`
	Host  string `json:"host"` // host:port
}

// Progress is how much of the overlay has arrived.
type Progress struct {
	Segments        int   `json:"segments"`
	SegmentsPresent int   `json:"segments_present"`
	BytesFetched    int64 `json:"bytes_fetched"`
	OverlayBytes    int64 `json:"overlay_bytes"`
	Complete        bool  `json:"complete"`
}

// At returns the time of the first step named step, and whether there is
// one.
func (v *VM) At(step string) (float64, bool) {
	for _, s := range v.Timeline {
		if s.Step == step {
			return s.At, true
		}
	}
	return 0, false
}

// Base is a base VM the cloudlet holds: GET /v1/bases.
type Base struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	DiskBytes   int64  `json:"disk_bytes"`
	MemoryBytes int64  `json:"memory_bytes"`
	// Runnable says the base has a vm.json, so VMs of it can run here.
	Runnable bool `json:"runnable"`
}

// Error is the body of every reply that is not a success.
type Error struct {
	Error string `json:"error"`
	// Field names the request field at fault, for a 400.
	Field string `json:"field,omitempty"`
}

// Timeline steps the cloudlet adds to those of the launch.
const (
	StepRequested = "requested" // the request was admitted
	StepFailed    = "failed"
)
