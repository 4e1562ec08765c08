package auth

import (
	"context"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server"
)

// rule says what a method needs: one of perms on every target its request
// names. A rule without check (ListQueues) needs perms[0] on some queue, and
// narrows what the handler shows with scope.
type rule struct {
	perms []Permission
	check func(req any) []target
	scope func(ctx context.Context, p *principal) context.Context
}

// target is a queue or channel name (or a Subscribe pattern) a request acts
// on. Names that fail validation are left out: the handler rejects them with
// INVALID_ARGUMENT, and they can touch nothing.
type target struct {
	name    string
	pattern bool
}

func names(what string, ns ...string) []target {
	var ts []target
	for _, n := range ns {
		if n != "" && server.ValidateName(what, n) == nil {
			ts = append(ts, target{name: n})
		}
	}
	return ts
}

// tokenQueues names the queues of ack tokens. Malformed tokens are left out
// (the handler rejects them); a token names the queue whose lease it holds,
// and a forged token can only refer to a lease of the queue it names.
func tokenQueues(tokens []string) []target {
	seen := map[string]bool{}
	var ts []target
	for _, t := range tokens {
		q, err := server.AckTokenQueue(t)
		if err != nil || seen[q] {
			continue
		}
		seen[q] = true
		ts = append(ts, target{name: q})
	}
	return ts
}

// queueOf adapts a request type with a GetQueue method.
func queueOf[T interface{ GetQueue() string }](req any) []target {
	r, ok := req.(T)
	if !ok {
		return nil
	}
	return names("queue", r.GetQueue())
}

var (
	queueRead = []Permission{Produce, Consume, Admin}
	admin     = []Permission{Admin}
)

// methods maps every QueueService and AdminService method to its rule. A
// test checks that no method of either service is missing.
var methods = map[string]rule{
	qbridgev1.QueueService_Enqueue_FullMethodName:      {perms: []Permission{Produce}, check: queueOf[*qbridgev1.EnqueueRequest]},
	qbridgev1.QueueService_EnqueueBatch_FullMethodName: {perms: []Permission{Produce}, check: queueOf[*qbridgev1.EnqueueBatchRequest]},
	qbridgev1.QueueService_Consume_FullMethodName: {perms: []Permission{Consume}, check: func(req any) []target {
		r, _ := req.(*qbridgev1.ConsumeRequest)
		return names("queue", append([]string{r.GetQueue()}, r.GetQueues()...)...)
	}},
	qbridgev1.QueueService_Ack_FullMethodName: {perms: []Permission{Consume}, check: func(req any) []target {
		r, _ := req.(*qbridgev1.AckRequest)
		return tokenQueues(r.GetAckTokens())
	}},
	qbridgev1.QueueService_Nack_FullMethodName: {perms: []Permission{Consume}, check: func(req any) []target {
		r, _ := req.(*qbridgev1.NackRequest)
		return tokenQueues(r.GetAckTokens())
	}},
	qbridgev1.QueueService_ExtendLease_FullMethodName: {perms: []Permission{Consume}, check: func(req any) []target {
		r, _ := req.(*qbridgev1.ExtendLeaseRequest)
		return tokenQueues(r.GetAckTokens())
	}},
	qbridgev1.QueueService_Publish_FullMethodName: {perms: []Permission{Publish}, check: func(req any) []target {
		r, _ := req.(*qbridgev1.PublishRequest)
		return names("channel", r.GetChannel())
	}},
	qbridgev1.QueueService_Subscribe_FullMethodName: {perms: []Permission{Subscribe}, check: func(req any) []target {
		r, _ := req.(*qbridgev1.SubscribeRequest)
		ts := names("channel", r.GetChannels()...)
		for _, p := range r.GetPatterns() {
			if p != "" && server.ValidatePattern(p) == nil {
				ts = append(ts, target{name: p, pattern: true})
			}
		}
		return ts
	}},
	qbridgev1.QueueService_GetQueueStats_FullMethodName: {perms: queueRead, check: queueOf[*qbridgev1.GetQueueStatsRequest]},
	qbridgev1.QueueService_GetResult_FullMethodName:     {perms: []Permission{Produce, Consume}, check: queueOf[*qbridgev1.GetResultRequest]},
	qbridgev1.QueueService_GetMessage_FullMethodName:    {perms: queueRead, check: queueOf[*qbridgev1.GetMessageRequest]},

	qbridgev1.AdminService_ListQueues_FullMethodName: {perms: admin, scope: func(ctx context.Context, p *principal) context.Context {
		return server.WithQueueFilter(ctx, func(q string) bool { return p.may(admin, q, false) })
	}},
	qbridgev1.AdminService_PeekMessages_FullMethodName:      {perms: admin, check: queueOf[*qbridgev1.PeekMessagesRequest]},
	qbridgev1.AdminService_PurgeQueue_FullMethodName:        {perms: admin, check: queueOf[*qbridgev1.PurgeQueueRequest]},
	qbridgev1.AdminService_PauseQueue_FullMethodName:        {perms: admin, check: queueOf[*qbridgev1.PauseQueueRequest]},
	qbridgev1.AdminService_ResumeQueue_FullMethodName:       {perms: admin, check: queueOf[*qbridgev1.ResumeQueueRequest]},
	qbridgev1.AdminService_DeleteQueue_FullMethodName:       {perms: admin, check: queueOf[*qbridgev1.DeleteQueueRequest]},
	qbridgev1.AdminService_ReplayDeadLetters_FullMethodName: {perms: admin, check: queueOf[*qbridgev1.ReplayDeadLettersRequest]},
	qbridgev1.AdminService_DeleteDeadLetters_FullMethodName: {perms: admin, check: queueOf[*qbridgev1.DeleteDeadLettersRequest]},
	qbridgev1.AdminService_GetQueueConfig_FullMethodName:    {perms: admin, check: queueOf[*qbridgev1.GetQueueConfigRequest]},
	qbridgev1.AdminService_UpdateQueueConfig_FullMethodName: {perms: admin, check: queueOf[*qbridgev1.UpdateQueueConfigRequest]},
}
